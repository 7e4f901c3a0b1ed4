"""EngineCore: one engine step (schedule -> run -> sample -> postprocess) and request outputs.

Lives on the engine thread; it is the only code that touches the model, the KV pool and the
sequences. Requests come in through :meth:`add` / :meth:`abort`, outputs leave through each
sequence's ``emit`` callback.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Sequence
from .tokenizer import Tokenizer

logger = logging.getLogger("nbengine")


class EngineCore:
    def __init__(self, config: EngineConfig, model_dir: Path, tokenizer: Tokenizer | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(config, model_dir)
        self.pool = self.runner.pool
        mc = self.runner.model_config
        self.scheduler = Scheduler(self.pool, self.runner.max_running, self.runner.token_budget)
        eos = list(mc.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = eos
        seed = config.random_seed if config.random_seed is not None else int(torch.randint(0, 2**30, ()).item())
        self.sampler = Sampler(mc.vocab_size, eos, self.runner.device, seed)
        self.seqs: dict[str, Sequence] = {}
        self.num_finished = 0
        self.last_gen_throughput = 0.0  # tokens sampled per second in the latest step

    # --------------------------------------------------------------- intake
    def add(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.rid in self.seqs:
                self._finish(seq, {"type": "abort", "message": f"a request with rid {seq.rid!r} is already running"},
                             registered=False)
                continue
            try:
                if self.tokenizer is not None:
                    seq.detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, seq.params)
                if seq.params.seed is not None:
                    seq.generator = torch.Generator(device=self.runner.device)
                    seq.generator.manual_seed(seq.params.seed)
            except Exception as e:  # noqa: BLE001 - fail this request (its caller raises e), not the engine
                logger.exception("could not start request %s", seq.rid)
                try:
                    seq.emit(e)
                except Exception:  # noqa: BLE001 - the caller may be gone already
                    pass
                continue
            if seq.logprob.return_logprob and seq.logprob.logprob_start_len == 0:
                # the first prompt token has no logprob: SGLang reports it as None
                seq.input_token_logprobs.append((None, seq.prompt_ids[0], None))
                if seq.logprob.top_logprobs_num > 0:
                    seq.input_top_logprobs.append(None)
            self.seqs[seq.rid] = seq
            self.scheduler.add(seq)

    def abort(self, rid: str | None, message: str = "Aborted by the user") -> None:
        targets = list(self.seqs.values()) if rid is None else [self.seqs[rid]] if rid in self.seqs else []
        for seq in targets:
            self._finish(seq, {"type": "abort", "message": message})

    def abort_all(self, error: BaseException) -> None:
        """Engine is going away: every live request gets ``error``."""
        for seq in list(self.seqs.values()):
            self.seqs.pop(seq.rid, None)
            try:
                seq.emit(error)
            except Exception:  # noqa: BLE001 - the caller may be gone already
                pass

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ----------------------------------------------------------------- step
    @torch.inference_mode()  # the sampler edits the step's (inference-mode) logits in place
    def step(self) -> None:
        items = self.scheduler.schedule()
        if not items:
            return
        t0 = time.perf_counter()
        out, items = self.runner.run(items)
        for it in items:
            it.seq.num_computed += it.num_tokens
        for it, (r0, n, pos) in zip(items, out.input_rows):
            if n:
                self._input_logprobs(it.seq, pos, out.logits[r0 : r0 + n])
        sampling = [(it, r) for it, r in zip(items, out.sample_rows) if r >= 0]
        if not sampling:
            return
        seqs = [it.seq for it, _ in sampling]
        rows = [r for _, r in sampling]
        if out.logits.is_cuda and rows == list(range(len(rows))):
            # every logits row samples (GPU decodes): no gather and no host-to-device copy of the rows
            # (on CPU the gather is a few microseconds; the CPU path is kept as it was)
            logits = out.logits[: len(rows)]
        else:
            logits = out.logits.index_select(0, torch.tensor(rows, device=out.logits.device))
        result = self.sampler(logits, seqs)
        self.last_gen_throughput = len(seqs) / max(time.perf_counter() - t0, 1e-9)
        for i, seq in enumerate(seqs):
            lp = result.logprobs[i] if result.logprobs is not None else None
            top = result.top[i] if result.top is not None else None
            self._append(seq, result.tokens[i], lp, top)

    def _input_logprobs(self, seq: Sequence, lo: int, logits: torch.Tensor) -> None:
        """Logits of prompt positions ``lo, lo+1, ...`` score prompt tokens ``lo+1, lo+2, ...``."""
        lps = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(seq.prompt_ids[lo + 1 : lo + 1 + logits.shape[0]], device=lps.device)
        chosen = lps.gather(1, targets.view(-1, 1)).view(-1).tolist()
        k = seq.logprob.top_logprobs_num
        tops = lps.topk(k, dim=-1) if k > 0 else None
        for j, tok in enumerate(targets.tolist()):
            seq.input_token_logprobs.append((chosen[j], tok, None))
            if k > 0:
                seq.input_top_logprobs.append([(v, t, None) for v, t in zip(tops.values[j].tolist(), tops.indices[j].tolist())])
        seq.input_lp_pos = lo + logits.shape[0]

    # ---------------------------------------------------------- postprocess
    def _append(self, seq: Sequence, token: int, lp: float | None, top: list | None) -> None:
        p = seq.params
        if p.max_new_tokens == 0:
            self._finish(seq, {"type": "length", "length": 0})
            return
        seq.output_ids.append(token)
        if lp is not None:
            seq.output_token_logprobs.append((lp, token, None))
            if top is not None and seq.logprob.top_logprobs_num > 0:
                seq.output_top_logprobs.append([(v, t, None) for v, t in top])
        is_stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)
        if seq.detok is not None and (not is_stop_token or p.no_stop_trim):
            seq.detok.add(token)
        n_out = len(seq.output_ids)
        if is_stop_token:
            self._finish(seq, {"type": "stop", "matched": token})
        elif seq.detok is not None and seq.detok.matched_stop is not None:
            self._finish(seq, {"type": "stop", "matched": seq.detok.matched_stop})
        elif p.max_new_tokens is not None and n_out >= p.max_new_tokens:
            self._finish(seq, {"type": "length", "length": p.max_new_tokens})
        elif seq.num_tokens >= self.runner.context_length:
            self._finish(seq, {"type": "length", "length": n_out})
        elif seq.stream:
            interval = p.stream_interval or self.config.stream_interval
            if n_out - seq.last_emitted_tokens >= interval:
                self._emit(seq)

    def _finish(self, seq: Sequence, reason: dict[str, Any], registered: bool = True) -> None:
        seq.finish_reason = reason
        if registered:
            self.scheduler.remove(seq)
            self.seqs.pop(seq.rid, None)
            self.num_finished += 1
        if seq.detok is not None and reason["type"] != "abort":
            seq.detok.flush()
        self._emit(seq)

    def _emit(self, seq: Sequence) -> None:
        try:
            seq.emit(self.make_output(seq))
        except Exception:  # noqa: BLE001 - a caller whose loop closed must not kill the engine
            logger.warning("could not deliver output of request %s; aborting it", seq.rid, exc_info=True)
            if seq.rid in self.seqs:
                self.scheduler.remove(seq)
                self.seqs.pop(seq.rid, None)

    def make_output(self, seq: Sequence) -> dict[str, Any]:
        incremental = self.config.incremental_streaming_output and seq.stream
        finished = seq.finish_reason is not None
        text = None
        if seq.detok is not None:
            full = seq.detok.text if finished else seq.detok.visible
            text = full[seq.last_emitted_text :] if incremental else full
            seq.last_emitted_text = len(full)
        ids = seq.output_ids[seq.last_emitted_tokens :] if incremental else list(seq.output_ids)
        n_before = seq.last_emitted_tokens
        seq.last_emitted_tokens = len(seq.output_ids)
        meta: dict[str, Any] = {
            "id": seq.rid,
            "finish_reason": seq.finish_reason,
            "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": len(seq.output_ids),
            "cached_tokens": 0,
        }
        if finished:
            meta["e2e_latency"] = time.perf_counter() - seq.arrival
        if seq.num_preemptions:
            meta["num_retractions"] = seq.num_preemptions
        if seq.logprob.return_logprob:
            start = n_before if incremental else 0
            meta["input_token_logprobs"] = seq.input_token_logprobs
            meta["output_token_logprobs"] = seq.output_token_logprobs[start:]
            if seq.logprob.top_logprobs_num > 0:
                meta["input_top_logprobs"] = seq.input_top_logprobs
                meta["output_top_logprobs"] = seq.output_top_logprobs[start:]
        out: dict[str, Any] = {"output_ids": ids, "meta_info": meta}
        if text is not None:
            out = {"text": text, **out}
        if seq.stream and seq.index is not None:
            out["index"] = seq.index
        return out

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        pool = self.pool
        return {
            "max_total_num_tokens": pool.capacity_tokens,
            "kv_pages_total": pool.capacity_pages,
            "kv_pages_free": pool.num_free_pages,
            "kv_pages_used": pool.num_used_pages,
            "kv_token_usage": pool.num_used_pages / max(1, pool.capacity_pages),
            "page_size": pool.page_size,
            "num_running_reqs": len(self.scheduler.running),
            "num_waiting_reqs": len(self.scheduler.waiting),
            "num_finished_reqs": self.num_finished,
            "num_preemptions": self.scheduler.num_preemptions,
            "last_gen_throughput": self.last_gen_throughput,
            "max_running_requests": self.scheduler.max_running,
            "chunked_prefill_size": self.scheduler.token_budget,
            "context_length": self.runner.context_length,
            "device": str(self.runner.device),
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "architecture": self.runner.model_config.architecture,
            "attention_backend": self.runner.ops.name,
            "cuda_graph_batch_sizes": self.runner.graphs.sizes if self.runner.graphs is not None else [],
            **self.runner.startup,
        }

    def release(self) -> None:
        self.runner.release()
