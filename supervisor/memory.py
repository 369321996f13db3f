"""What a loaded model costs in memory, before and after it loads.

need(model) = weights + kv + prompt_cache + overhead         (all in bytes)

    weights  = manifest.weight_bytes (sum of the safetensors tensor sizes)
    kv       = kv_bytes_per_token x num_ctx x num_parallel
    overhead = runtime + kv_slack + prefill + decode

    runtime  = RUNTIME_BYTES: the runner process with nothing in flight and no
               weights: python + mlx + mlx_lm + tokenizer + HTTP server, plus
               what the first generation leaves behind (compiled kernels, the
               allocator's pools). Measured: 77 MiB RSS after importing
               mlx_lm and loading the tiny model, +7 MiB for starlette,
               uvicorn and httpx, +12 MiB after the first batched generation;
               the runner's later features (grammar, prompt cache, encoders,
               device reports) added more: a tiny model's runner with a full
               3 MiB prompt cache peaked at 126 MiB, 121 of it runtime.
               118 MiB, with kv_slack and the decode term, covers that.
    kv_slack = kv_bytes_per_token x num_parallel x KV_STEP: mlx_lm grows
               each cache in steps of 256 tokens, so a sequence can hold up
               to one step more than num_ctx.
             + kv: while a cache grows, and when a prompt's cache joins the
               decode batch, old and new buffers coexist for a moment.
    prefill  = tokens x ACT_PER_TOKEN x act_bytes, tokens = num_parallel x
               min(num_ctx, PREFILL_STEP) (a full batch prefilled at once, one
               2048-token chunk per sequence); ACT_PER_TOKEN = 8 x hidden +
               3 x intermediate covers the residual stream, q/k/v/o and the
               gate/up/product of the MLP alive at once.
             + scores (CPU only): num_parallel x heads x min(num_ctx,
               PREFILL_STEP) x num_ctx x 4 bytes x 1.25. The CPU backend
               does not fuse attention: the last prefill chunk's float32
               scores against every key are one real buffer, and at long
               contexts it dominates (measured: mlx's peak is the scores
               plus ~12%, for the mask and softmax temporaries and
               everything else). Metal and CUDA run a fused attention kernel
               that never materializes the scores, so the term is left out
               there (`device`, from the runners' device reports).
    decode   = num_parallel x vocab x 4 bytes x 4 (float32 logits, log-softmax
               and the sampler's copies, one step at a time).

    prompt_cache = the runner's prompt-cache budget (CORRAL_PROMPT_CACHE: a
               size, or a share of weights + kv, resolved by the same
               function the runner uses). The runner evicts by bytes to stay
               within it, so a full cache adds exactly this much; the copy a
               cache hit makes is one sequence's KV at most, already inside
               kv_slack's second kv.

"peak" is the runner process's peak RSS: on the CPU backend every MLX
buffer lives in RSS, and it is what the OS must have free. Measured on this
repo's generated llama test models (4 heads, float32 unless 4-bit; Linux, mlx
0.32.4 CPU, mlx-lm 0.32.2, `scripts/calibrate_memory.py --table`: load with
mlx_lm, then BatchGenerator decoding num_parallel sequences whose prompt +
output fill num_ctx exactly, each row in a fresh process):

    model (weights)               ctx  par  baseline  peak RSS   estimate  est/peak
    tiny  h64  L2 f32  (0.6 MB)   256   4   78.4 MiB   91.2 MiB  130.5 MiB  1.43
    q4    h128 L2 4bit (0.35 MB)  256   4   78.3 MiB   97.6 MiB  136.9 MiB  1.40
    big   h256 L4 f32  (11.5 MB)  256   4   88.8 MiB  123.9 MiB  176.8 MiB  1.43
    big                          2048   4   88.8 MiB  532.6 MiB  715.8 MiB  1.34
    tiny                         4096   2   78.2 MiB  379.7 MiB  471.2 MiB  1.24
    tiny                         8192   1   78.3 MiB  373.4 MiB  464.0 MiB  1.24
    tiny                        20000   1   78.1 MiB  737.4 MiB  951.2 MiB  1.29
    q4                          20000   1   78.2 MiB  795.4 MiB  1002.1 MiB  1.26

("baseline" = RSS right after loading, which includes the weights.)

The same through the real runner (python -m corral.runner --num-ctx C
--num-parallel P, P concurrent /completion requests each filling C tokens,
then GET /status memory.peak_rss; estimates by the formula above):

    model   ctx  par  peak RSS   estimate   est/peak
    tiny    256   4    91.2 MiB  130.5 MiB  1.43
    q4      256   4   103.7 MiB  136.9 MiB  1.32
    big     256   4   135.3 MiB  176.8 MiB  1.31
    big    1024   4   284.8 MiB  347.8 MiB  1.22
    big    2048   1   221.6 MiB  277.8 MiB  1.25
    big    2048   4   497.8 MiB  715.8 MiB  1.44
    tiny   4096   2   394.5 MiB  471.2 MiB  1.19   (prefill in 2048-token chunks)

On Metal and CUDA the scores term is left out; there is no such machine here
to measure, and what remains are buffers every backend allocates.

tests/test_memory.py checks peak <= estimate <= 1.5 x peak for the three
test models at ctx 256, par 4, both ways, and for tiny at ctx 8192.

A loaded model's footprint is max(estimate, what its runner reports), so a
runner that outgrows its estimate is charged what it really uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
from corral.runner.embed_spec import EMBED_BATCH_TOKENS, KIND_EMBEDDING
from corral.runner.protocol import DEFAULT_PROMPT_CACHE, prompt_cache_budget
from corral.supervisor.manifest import Manifest

MiB = 1024 * 1024
RUNTIME_BYTES = 118 * MiB
KV_STEP = 256  # mlx_lm.models.cache.KVCache.step
PREFILL_STEP = 2048  # mlx_lm's default prefill_step_size
_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
FUSED_ATTENTION = frozenset({"metal", "cuda"})
"""Devices whose attention kernel never materializes the scores matrix."""


@dataclass(frozen=True)
class NeedEstimate:
    weights: int
    kv: int
    overhead: int
    total: int
    prompt_cache: int = 0  # the prompt cache's budget (part of total)


def estimate_need(manifest: Manifest, num_ctx: int, num_parallel: int, *,
                  prompt_cache: str = DEFAULT_PROMPT_CACHE, device: str = "cpu") -> NeedEstimate:
    """Upper bound on the runner's peak memory for this model and shape (formula above);
    `prompt_cache` is the CORRAL_PROMPT_CACHE setting, `device` the runner's device kind
    ("cpu", "metal", "cuda": runner/device.py; only the CPU materializes attention scores)."""
    num_ctx = max(1, int(num_ctx))
    num_parallel = max(1, int(num_parallel))
    if manifest.kind == KIND_EMBEDDING:
        return estimate_embedding_need(manifest, num_ctx)
    weights = manifest.weight_bytes
    kv = manifest.kv_bytes_per_token * num_ctx * num_parallel
    overhead = (RUNTIME_BYTES + _kv_slack(manifest, kv, num_parallel)
                + _prefill(manifest, num_ctx, num_parallel, scores=device not in FUSED_ATTENTION))
    overhead += num_parallel * max(manifest.vocab_size, 1) * 4 * 4
    cache = prompt_cache_budget(prompt_cache, weights + kv)
    return NeedEstimate(weights=weights, kv=kv, overhead=overhead, total=weights + kv + overhead + cache,
                        prompt_cache=cache)


def _kv_slack(manifest: Manifest, kv: int, num_parallel: int) -> int:
    return manifest.kv_bytes_per_token * num_parallel * KV_STEP + kv


def _prefill(manifest: Manifest, num_ctx: int, num_parallel: int, *, scores: bool = True) -> int:
    chunk = min(num_ctx, PREFILL_STEP)
    hidden = manifest.hidden_size or manifest.num_heads * manifest.head_dim
    intermediate = manifest.intermediate_size or 4 * hidden
    act_bytes = _DTYPE_BYTES.get(manifest.dtype, 4)
    acts = num_parallel * chunk * (8 * hidden + 3 * intermediate) * act_bytes
    if not scores:
        return acts
    heads = manifest.num_heads or manifest.kv_heads
    return acts + num_parallel * heads * chunk * num_ctx * 4 * 5 // 4


# ---- embedding models -----------------------------------------------------
#
# need = weights + RUNTIME_BYTES + batch activations; no KV cache. The runner
# runs at most EMBED_BATCH_TOKENS padded tokens per forward pass (inputs of
# up to L = min(num_ctx, EMBED_BATCH_TOKENS) tokens each), so the activations
# are those of one prefill chunk of that many tokens: the residual stream and
# MLP as for chat models, plus attention scores heads x tokens x L x 4 bytes
# x 1.5, plus the pooled float32 vectors. Concurrent requests share batches,
# so num_parallel does not multiply anything.


def estimate_embedding_need(manifest: Manifest, num_ctx: int) -> NeedEstimate:
    tokens = EMBED_BATCH_TOKENS
    longest = min(max(1, num_ctx), tokens)
    hidden = manifest.hidden_size or manifest.num_heads * manifest.head_dim
    intermediate = manifest.intermediate_size or 4 * hidden
    act_bytes = _DTYPE_BYTES.get(manifest.dtype, 4)
    acts = tokens * (8 * hidden + 3 * intermediate) * act_bytes
    scores = (manifest.num_heads or 1) * tokens * longest * 4 * 3 // 2
    overhead = RUNTIME_BYTES + acts + scores + tokens * hidden * 4
    weights = manifest.weight_bytes
    return NeedEstimate(weights=weights, kv=0, overhead=overhead, total=weights + overhead)


class MemoryProbe(Protocol):
    def total(self) -> int: ...

    def available(self) -> int: ...


class SystemMemoryProbe:
    """The machine's memory as the OS reports it (psutil.virtual_memory)."""

    def total(self) -> int:
        return int(psutil.virtual_memory().total)

    def available(self) -> int:
        return int(psutil.virtual_memory().available)


class DeviceMemoryProbe:
    """A MemoryProbe fed by the device facts runners report (runner/device.py: a standby's
    stderr line at startup, then every loaded runner's /status).

    CUDA: the GPU's own total and free memory, as last reported (the supervisor cannot
    read them itself: it never imports mlx). Metal (unified memory) and CPU: the host
    probe, read live. Before any report: the host probe. `report` is called only by the
    scheduler's dispatcher.
    """

    def __init__(self, host: MemoryProbe) -> None:
        self.host = host
        self.facts: dict[str, Any] | None = None

    def report(self, facts: Any) -> None:
        """Take a runner's `device_facts` (anything else is ignored)."""
        if isinstance(facts, Mapping) and facts.get("device") in ("metal", "cuda", "cpu"):
            self.facts = dict(facts)

    @property
    def device(self) -> str:
        """The reported device kind; "cpu" until a runner has reported."""
        return str(self.facts["device"]) if self.facts else "cpu"

    def total(self) -> int:
        if self.facts and self.device == "cuda" and _positive(self.facts.get("total")):
            return int(self.facts["total"])
        return self.host.total()

    def available(self) -> int:
        if self.facts and self.device == "cuda" and _non_negative(self.facts.get("free")):
            return int(self.facts["free"])
        return self.host.available()

    def limit(self) -> tuple[int, str]:
        """The default memory limit and where it comes from (device_limit)."""
        return device_limit(self.facts, self.host.total())


def reported_bytes(status: Mapping[str, Any]) -> int:
    """What a runner's GET /status says it holds.

    On the CPU backend MLX buffers are ordinary heap memory, already in RSS.
    On a GPU backend (Metal, CUDA) they are not (or not fully) counted in
    RSS, so the allocator's active and cached bytes are added.
    """
    mem = status.get("memory")
    if not isinstance(mem, Mapping):
        return 0

    def num(key: str) -> int:
        v = mem.get(key)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else 0

    if status.get("device", "cpu") == "cpu":
        return num("rss")
    return num("rss") + num("active") + num("cache")


def footprint(estimate_total: int, status: Mapping[str, Any]) -> int:
    """A loaded model's charge: max(estimate, what its runner reports)."""
    return max(int(estimate_total), reported_bytes(status))


def device_limit(facts: Mapping[str, Any] | None, ram_total: int) -> tuple[int, str]:
    """The default memory limit for the device a runner reported (its /status
    `device_facts`, see runner/device.py), and where it came from.

    Metal: the GPU may use at most the recommended working set, not all of RAM.
    CUDA: the GPU's own memory, not host RAM. CPU (or no report yet): physical memory.
    """
    device = facts.get("device") if facts else None
    if facts and device == "metal" and _positive(facts.get("recommended")):
        return int(facts["recommended"]), "metal recommended working set"
    if facts and device == "cuda" and _positive(facts.get("total")):
        return int(facts["total"]), "cuda device memory"
    return int(ram_total), "physical memory"


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
