"""The engine thread's OpenMP team sizing changes only that thread, and only between kernels."""

from __future__ import annotations

import threading

import pytest
import torch

from nbengine.layers.cpu_threads import WIDE_STEP_TOKENS, omp_team

pytestmark = pytest.mark.skipif(omp_team._set is None, reason="torch here does not use GNU OpenMP with >1 thread")


def test_team_narrows_for_small_steps_widens_around_kernels_and_leaves_other_threads_alone():
    main_before = torch.get_num_threads()
    seen: dict[str, int] = {}

    def engine_thread() -> None:
        omp_team.manage_this_thread()
        omp_team.begin_step(8)
        seen["small_step"] = torch.get_num_threads()
        seen["inside_wide"] = omp_team.wide(torch.get_num_threads)
        seen["after_wide"] = torch.get_num_threads()
        omp_team.begin_step(WIDE_STEP_TOKENS)
        seen["big_step"] = torch.get_num_threads()

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    wide = omp_team.wide_threads
    assert seen == {"small_step": 1, "inside_wide": wide, "after_wide": 1, "big_step": wide}
    assert torch.get_num_threads() == main_before
    # an unmanaged thread (this one) is never narrowed
    omp_team.begin_step(1)
    assert omp_team.wide(torch.get_num_threads) == main_before == torch.get_num_threads()
