"""EngineCore: one engine step (schedule -> run -> sample -> postprocess) and request outputs.

Lives on the engine thread; it is the only code that touches the model, the KV pool and the
sequences. Requests come in through :meth:`add` / :meth:`abort`, outputs leave through each
sequence's ``emit`` callback.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .grammar import MaskJob, apply_masks
from .inflight import HostIds, InFlightStep, deferrable
from .logit_processor import apply_processors
from .model_runner import ModelRunner
from .page_allocator import PageAllocator
from .prefix_cache import PrefixCache
from .request_output import RequestOutput
from .request_stats import RequestStats
from .sampler import SampleResult, Sampler, add_input_logprobs
from .scheduler import ScheduledSeq, Scheduler
from .sequence import Sequence
from .tokenizer import Tokenizer

logger = logging.getLogger("nbengine")


class EngineCore:
    def __init__(self, config: EngineConfig, model_dir: Path, tokenizer: Tokenizer | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.workers = None  # the other tensor-parallel ranks (TPWorkers), when tp_size > 1
        if config.tp_size > 1:
            from .parallel.workers import TPWorkers

            self.workers = TPWorkers(config, model_dir)
        try:
            self.runner = ModelRunner(config, model_dir, comm=self.workers.comm if self.workers else None)
        except BaseException as e:
            if self.workers is not None:
                self.workers.stop()
                self.workers.raise_startup_failure(e)
            raise
        kv = self.runner.kv_cache
        self.pool = PageAllocator(kv.num_pages, kv.page_size)
        self.prefix_cache = None if config.disable_radix_cache else PrefixCache(self.pool)
        mc = self.runner.model_config
        self.scheduler = Scheduler(self.pool, self.runner.max_running, self.runner.token_budget,
                                   self.prefix_cache,
                                   # tensor parallel: a copy on rank 0 alone would leave the other ranks' shards
                                   # behind, so a forked sample recomputes its partial page instead
                                   kv.copy_page if self.workers is None else None)
        eos = list(mc.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = eos
        seed = config.random_seed if config.random_seed is not None else int(torch.randint(0, 2**30, ()).item())
        self.sampler = Sampler(mc.vocab_size, eos, self.runner.device, seed)
        self.seqs: dict[str, Sequence] = {}
        self.num_finished = 0
        self.last_gen_throughput = 0.0  # tokens sampled per second in the latest step
        self.stats = RequestStats()  # recent requests and tokens per second, read as copies from any thread
        # one request may not run past the context length, nor past what the KV pool holds
        self.max_request_tokens = min(self.runner.context_length, self.pool.capacity_tokens)
        # fault injection for tests: called as fault_hook(site, seqs) at "runner", "sampler", "detokenizer"
        self.fault_hook: Callable[[str, list[Sequence]], None] | None = None
        # overlap scheduling: on CUDA the next step is scheduled and launched before this one's ids are read.
        # On CPU every op runs before it returns, so there is nothing to overlap (and reading a step late
        # would only delay its tokens): the loop stays synchronous there.
        # (not with tensor parallelism: the other ranks would need the sampled ids on their devices too)
        self.overlap = (self.runner.device.type == "cuda" and not config.disable_overlap_schedule
                        and self.workers is None)
        self.in_flight: InFlightStep | None = None
        self._outbox: dict[Any, list[tuple[Sequence, int, Any]]] | None = None  # a step's outputs, per caller
        self._host_ids = HostIds(self.runner.max_running, self.runner.device)
        self._masks: MaskJob | None = None  # the running step's grammar masks
        self.mask_vocab = max(mc.vocab_size, tokenizer.vocab_size if tokenizer is not None else 0)

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
        return self.scheduler.has_work() or self.in_flight is not None

    # ----------------------------------------------------------------- step
    def step(self) -> None:
        """One step; the outputs it makes reach each ``generate`` call in one delivery at the end."""
        self._outbox = {}
        try:
            self._step()
        finally:
            outbox, self._outbox = self._outbox, None
            for sink, entries in outbox.items():
                try:
                    sink.deliver([(i, out) for _, i, out in entries])
                except Exception:  # noqa: BLE001 - a caller whose loop closed must not kill the engine
                    logger.warning("could not deliver outputs of %d requests; aborting them", len(entries),
                                   exc_info=True)
                    for seq, _, _ in entries:
                        self._drop(seq)

    @torch.inference_mode()  # the sampler edits the step's (inference-mode) logits in place
    def _step(self) -> None:
        """One step. An error in the scheduler or the model runner propagates (the engine thread dies:
        the model and KV state can't be trusted); an error tied to one request ends only that request.

        With overlap, a step that needs nothing from the host between sampling and the next step (no
        logprobs, penalties or ``min_new_tokens``) leaves its sampled ids on the device; they are read and
        appended in the next step, after that step is launched."""
        items = self.scheduler.schedule()
        for seq in self.scheduler.take_dropped():
            self._finish(seq, {"type": "abort", "message": (
                f"the request needs more KV slots ({seq.num_tokens + 1}) than the pool holds "
                f"({self.pool.capacity_tokens}); raise max_total_tokens or shorten it")})
        prev, self.in_flight = self.in_flight, None
        if not items:
            self._resolve(prev)
            return
        t0 = time.perf_counter()
        if self.fault_hook is not None:
            self._fault("runner", [it.seq for it in items])
        # the grammar masks of this step's constrained samples are filled while the forward runs
        self._masks = MaskJob([it.seq for it in items if it.samples and it.seq.grammar is not None],
                              self.mask_vocab)
        try:
            self._run_and_sample(items, prev, t0)
        finally:
            self._masks.result()  # never leave the helper thread touching a matcher after the step
            self._masks = None

    def _run_and_sample(self, items: list[ScheduledSeq], prev: InFlightStep | None, t0: float) -> None:
        out, items = self.runner.run(items, prev.ids if prev is not None else None)
        self.scheduler.advance(items)
        if self.overlap and deferrable(items, out.input_rows):
            sampling = [it.seq for it, r in zip(items, out.sample_rows) if r >= 0]
            try:
                self._fault("sampler", sampling)
                ids = self.sampler.sample(out.logits[: len(sampling)], sampling)
            except Exception:  # noqa: BLE001 - sample this step synchronously: its row-by-row fallback finds the culprit
                logger.warning("deferred sampling failed; sampling this step synchronously", exc_info=True)
            else:
                self.in_flight = self._host_ids.start(sampling, ids)
                self._resolve(prev)
                return
        self._resolve(prev)  # this step's sampling reads the outputs so far (min_new_tokens, penalties)
        for it, (r0, n, pos) in zip(items, out.input_rows):
            if n:
                self._guarded(it.seq, add_input_logprobs, it.seq, pos, out.logits[r0 : r0 + n])
        for it, (r0, n, pos) in zip(items, out.hidden_at or ()):
            if n:
                self._guarded(it.seq, it.seq.hidden.take, pos, out.hidden[r0 : r0 + n])
        sampling = [(it.seq, r) for it, r in zip(items, out.sample_rows) if r >= 0 and not it.seq.finished]
        if not sampling:
            return
        sampled = self._sample(out.logits, sampling)
        self.last_gen_throughput = len(sampled) / max(time.perf_counter() - t0, 1e-9)
        self.stats.add_tokens(len(sampled))
        for seq, token, lp, top in sampled:
            self._guarded(seq, self._append, seq, token, lp, top)

    def _resolve(self, step: InFlightStep | None) -> None:
        """Read a step's sampled ids and append them; sequences that ended meanwhile drop theirs."""
        if step is None:
            return
        for seq, token in zip(step.seqs, step.read()):
            if not seq.finished:
                self._guarded(seq, self._append, seq, token, None, None)
        self.stats.add_tokens(len(step.seqs))
        self.last_gen_throughput = len(step.seqs) / max(time.perf_counter() - step.launched, 1e-9)

    def _sample(self, logits: torch.Tensor, sampling: list[tuple[Sequence, int]]) -> list[tuple]:
        """``(seq, token, logprob, top)`` for each sampling row. When the batch fails, each row is sampled
        alone so that only the request at fault ends."""
        try:
            return _rows(self._sample_rows(logits, sampling), sampling)
        except Exception:  # noqa: BLE001 - find the request(s) at fault below
            if len(sampling) > 1:
                logger.warning("sampling a batch of %d failed; sampling its rows one by one", len(sampling))
        done = []
        for one in sampling:
            try:
                done += _rows(self._sample_rows(logits, [one]), [one])
            except Exception as e:  # noqa: BLE001 - this request's parameters broke the sampler
                self._fail(one[0], "sampling", e)
        return done

    def _sample_rows(self, logits: torch.Tensor, sampling: list[tuple[Sequence, int]]) -> SampleResult:
        seqs = [seq for seq, _ in sampling]
        self._fault("sampler", seqs)
        rows = [r for _, r in sampling]
        if logits.is_cuda and rows == list(range(len(rows))):
            # every logits row samples (GPU decodes): no gather and no host-to-device copy of the rows
            picked = logits[: len(rows)]
        else:
            picked = logits.index_select(0, torch.tensor(rows, device=logits.device))
        for i, seq in enumerate(seqs):
            if seq.label_ids is not None:  # score(): from the raw logits, before any processing
                lps = torch.log_softmax(picked[i, : self.runner.model_config.vocab_size].float(), dim=-1)
                seq.label_logprobs = lps[seq.label_ids].tolist()
        apply_processors(picked, seqs)  # the request's own code first: it cannot lift a grammar's mask
        apply_masks(picked, seqs, self._masks)
        return self.sampler(picked, seqs)

    def _guarded(self, seq: Sequence, fn: Callable[..., None], *args: Any) -> None:
        """Run one request's own work; an error there ends that request only."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            self._fail(seq, fn.__name__.strip("_"), e)

    def _fail(self, seq: Sequence, where: str, error: Exception) -> None:
        logger.error("request %s failed in %s; ending it", seq.rid, where, exc_info=error)
        if seq.finish_reason is None:
            self._finish(seq, _internal_error(where, error))

    def _fault(self, site: str, seqs: list[Sequence]) -> None:
        if self.fault_hook is not None:
            self.fault_hook(site, seqs)

    # ---------------------------------------------------------- postprocess
    def _append(self, seq: Sequence, token: int, lp: float | None, top: list | None) -> None:
        p = seq.params
        if p.max_new_tokens == 0:
            self._finish(seq, {"type": "length", "length": 0})
            return
        seq.output_ids.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            raise RuntimeError(f"token {token} was sampled outside the request's grammar")
        if seq.logprob.return_logprob:
            seq.output_token_logprobs.append((lp, token, None))
            if seq.logprob.top_logprobs_num > 0:
                seq.output_top_logprobs.append([(v, t, None) for v, t in top])
        is_stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)
        if seq.detok is not None and (not is_stop_token or p.no_stop_trim):
            self._fault("detokenizer", [seq])
            seq.detok.add(token)
        n_out = len(seq.output_ids)
        if is_stop_token or (seq.grammar is not None and seq.grammar.is_terminated()):
            self._finish(seq, {"type": "stop", "matched": token})
        elif seq.detok is not None and seq.detok.matched_stop is not None:
            self._finish(seq, {"type": "stop", "matched": seq.detok.matched_stop})
        elif p.max_new_tokens is not None and n_out >= p.max_new_tokens:
            self._finish(seq, {"type": "length", "length": p.max_new_tokens})
        elif seq.num_tokens >= self.max_request_tokens:
            self._finish(seq, {"type": "length", "length": n_out})
        elif seq.stream:
            interval = p.stream_interval or self.config.stream_interval
            if n_out - seq.last_emitted_tokens >= interval:
                self._emit(seq)

    def _finish(self, seq: Sequence, reason: dict[str, Any], registered: bool = True) -> None:
        if seq.detok is not None and reason["type"] != "abort":
            try:
                seq.detok.flush()
            except Exception as e:  # noqa: BLE001 - still finish (and answer) the request
                logger.error("request %s failed in the detokenizer; ending it", seq.rid, exc_info=e)
                reason = _internal_error("detokenizer", e)
        seq.finish_reason = reason
        if registered:
            self.scheduler.remove(seq)
            self.seqs.pop(seq.rid, None)
            self.num_finished += 1
            self.stats.finished(seq)
        self._emit(seq)

    def _emit(self, seq: Sequence) -> None:
        try:
            out: RequestOutput | Exception = self.make_output(seq)
        except Exception as e:  # noqa: BLE001 - the caller gets the error instead of waiting forever
            logger.exception("could not build the output of request %s; ending it", seq.rid)
            out = e
        if isinstance(out, Exception):
            self._drop(seq)
        sink = getattr(seq.emit, "sink", None)
        if self._outbox is not None and sink is not None:  # inside a step: delivered with the step's others
            self._outbox.setdefault(sink, []).append((seq, seq.emit.index, out))
            return
        try:
            seq.emit(out)
        except Exception:  # noqa: BLE001 - a caller whose loop closed must not kill the engine
            logger.warning("could not deliver output of request %s; aborting it", seq.rid, exc_info=True)
            self._drop(seq)

    def _drop(self, seq: Sequence) -> None:
        """Forget a live request without answering it again (its caller got an error or is gone)."""
        if self.seqs.get(seq.rid) is seq:
            self.scheduler.remove(seq)
            del self.seqs[seq.rid]

    def make_output(self, seq: Sequence) -> RequestOutput:
        """A snapshot of the request for its caller; costs the same whatever the length of the output."""
        incremental = self.config.incremental_streaming_output and seq.stream
        token_text = self.tokenizer.token_text if seq.logprob.return_text and self.tokenizer is not None else None
        return RequestOutput.snapshot(seq, incremental, token_text)

    # ------------------------------------------------------------------ info
    def flush_cache(self) -> int:
        """Empty the prefix cache; returns how many cached pages were forgotten."""
        return self.scheduler.flush_cache()

    def info(self) -> dict[str, Any]:
        pool, sched = self.pool, self.scheduler
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
            "kv_pages_cached": pool.num_evictable_pages,
            "prefix_cache": self.prefix_cache is not None,
            "cached_tokens_total": sched.cached_tokens_total,
            "prompt_tokens_total": sched.prompt_tokens_total,
            "cache_hit_rate": sched.cached_tokens_total / max(1, sched.prompt_tokens_total),
            "last_gen_throughput": self.last_gen_throughput,
            **self.stats.info(),
            "max_running_requests": self.scheduler.max_running,
            "chunked_prefill_size": self.scheduler.token_budget,
            "context_length": self.runner.context_length,
            "vocab_size": self.runner.model_config.vocab_size,
            "eos_token_ids": list(self.eos_ids),
            "device": str(self.runner.device),
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "quantization": self.runner.quantization,
            "architecture": self.runner.model_config.architecture,
            "attention_backend": self.runner.ops.name,
            "cuda_graph_batch_sizes": self.runner.graphs.sizes if self.runner.graphs is not None else [],
            **self.runner.startup,
        }

    def release(self) -> None:
        try:
            self.runner.release()
        finally:
            if self.workers is not None:
                self.workers.stop()


def _rows(result: SampleResult, sampling: list[tuple[Sequence, int]]) -> list[tuple]:
    return [(seq, result.tokens[i], result.logprobs[i] if result.logprobs is not None else None,
             result.top[i] if result.top is not None else None) for i, (seq, _) in enumerate(sampling)]


def _internal_error(where: str, error: Exception) -> dict[str, Any]:
    return {"type": "abort", "message": f"internal error in {where}: {type(error).__name__}: {error}"}
