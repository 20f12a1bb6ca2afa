"""Iteration latency of one MoE model on one GPU, from the batch's shape and each layer's expert activity.

This is the roofline fallback of the cost model: every kernel takes the larger of its memory time (bytes over
sustained bandwidth) and its compute time (FLOPs over sustained FLOP/s), plus a fixed per-kernel cost. That is
the whole mechanism Lynx exploits: in decode, the routed experts' time is set by how many *distinct* experts a
layer activates (each one's weights are read once), not by how many tokens use them, while in prefill the
FLOPs dominate and the expert count hardly matters.

The cost model is a pure function, called once per simulated iteration (hundreds of thousands of times per
run), so per-model constants are computed once in ``CostModel.__init__`` and the per-call work is a handful of
numpy reductions. Each component is a method, so that a subclass driven by measured kernel tables
(``HardwareProfile.measured``) can replace one component at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lynxsim.errors import InputError
from lynxsim.hardware import HardwareProfile
from lynxsim.models.spec import BYTES_PER_WEIGHT, ModelSpec

# Kernels whose fixed cost (``efficiency.kernel_launch_s``) is charged, per layer, counted as vLLM launches them
# for one decoder layer. Only kernels that stream weights or the KV cache are counted: that is the kind of kernel
# whose fixed cost was measured. Elementwise kernels (norms, rotary embedding, activation, top-k routing, KV-cache
# writes) move only activations; they cost about 1 us each in a CUDA-graph replay on an H200 and are left to the
# measured tables that replace this fallback.
ATTENTION_KERNELS_PER_LAYER = 1  # one attention kernel serves the prefill chunks and decode rows together
MOE_KERNELS_PER_LAYER = 2  # fused MoE: one grouped GEMM for gate+up, one for down, over all active experts
FFN_KERNELS = 2  # a dense FFN or the shared experts: gate+up GEMM, down GEMM
GQA_PROJECTION_KERNELS = 2  # fused QKV GEMM, output GEMM
ROUTER_KERNELS = 1
LM_HEAD_KERNELS = 1


def _int_array(values: object, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class BatchShape:
    """What one iteration processes: the prefill chunks and the decode rows of a mixed batch.

    ``prefill_chunk_tokens[i]`` new prompt tokens of prefilling sequence ``i`` run this iteration, after the
    ``prefill_context_tokens[i]`` tokens already in its KV cache (earlier chunks, or a cached prefix).
    ``decode_context_tokens[j]`` is the KV length decode sequence ``j`` attends to, its new token included.
    """

    prefill_chunk_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    prefill_context_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    decode_context_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        chunks = _int_array(self.prefill_chunk_tokens, "prefill_chunk_tokens")
        contexts = _int_array(self.prefill_context_tokens, "prefill_context_tokens")
        decode = _int_array(self.decode_context_tokens, "decode_context_tokens")
        if chunks.shape != contexts.shape:
            raise ValueError(
                f"prefill_chunk_tokens ({chunks.size}) and prefill_context_tokens ({contexts.size}) differ in length"
            )
        if chunks.size and chunks.min() < 1:
            raise ValueError("every prefill chunk holds at least one token")
        if contexts.size and contexts.min() < 0:
            raise ValueError("prefill_context_tokens must be non-negative")
        if decode.size and decode.min() < 1:
            raise ValueError("a decode row attends to at least its own token")
        object.__setattr__(self, "prefill_chunk_tokens", chunks)
        object.__setattr__(self, "prefill_context_tokens", contexts)
        object.__setattr__(self, "decode_context_tokens", decode)

    @property
    def num_prefill_tokens(self) -> int:
        return int(self.prefill_chunk_tokens.sum())

    @property
    def num_decode_tokens(self) -> int:
        return int(self.decode_context_tokens.size)

    @property
    def num_tokens(self) -> int:
        """Rows through every GEMM of the model this iteration."""
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def num_sequences(self) -> int:
        return int(self.prefill_chunk_tokens.size + self.decode_context_tokens.size)


@dataclass(frozen=True)
class LatencyBreakdown:
    """One iteration's latency in seconds, by where it goes (for plots and for checking the cost model)."""

    attention_s: float  # attention core: causal prefill FLOPs and the KV-cache reads of every row
    dense_s: float  # QKV/output projections, router, dense-FFN layers, shared experts, LM head
    moe_s: float  # routed experts
    communication_s: float  # GPU-to-GPU collectives; zero on one GPU
    overhead_s: float  # fixed per-iteration CPU/scheduler cost

    @property
    def total_s(self) -> float:
        return self.attention_s + self.dense_s + self.moe_s + self.communication_s + self.overhead_s

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_s": self.total_s}


@dataclass(frozen=True)
class _GemmGroup:
    """One dense weight matrix group that every layer of a kind runs: its bytes, FLOPs per row, how many
    times per iteration it runs (layers), and whether its rows are tokens or sampled sequences."""

    weight_bytes: float
    flops_per_row: float
    repeats: int
    kernels: int
    rows_are_sequences: bool


class CostModel:
    """Roofline iteration latency of ``model`` on one ``hardware`` GPU.

    Every kernel's time is ``max(bytes / sustained_bandwidth, flops / sustained_flops) + kernels * launch``,
    with the sustained figures and the launch cost from ``hardware.efficiency``.
    """

    source = "roofline"

    def __init__(self, model: ModelSpec, hardware: HardwareProfile) -> None:
        self.model = model
        self.hardware = hardware
        eff = hardware.efficiency
        self._bandwidth = hardware.sustained_bandwidth_bytes_per_s
        self._launch_s = eff.kernel_launch_s
        attn = model.attention

        # Routed experts: weights of one expert, FLOPs of one token-expert assignment (2 per weight).
        self._num_moe_layers = model.num_moe_layers
        self._num_experts = model.num_experts
        expert_flops_rate = hardware.sustained_flops_per_s(model.expert_weight_dtype or model.weight_dtype)
        self._expert_memory_s = model.expert_bytes / self._bandwidth
        self._assignment_compute_s = 2.0 * model.expert_params / expert_flops_rate
        self._moe_layers_launch_s = self._num_moe_layers * MOE_KERNELS_PER_LAYER * self._launch_s

        # Attention core. Per (query, key) pair and head: 2 FLOPs per element of the q.k dot product and of the
        # p.v product. MLA decode runs weight-absorbed (as vLLM and FlashMLA do): every head attends over the
        # cached latent, q.k over kv_lora_rank + rope dims and p.v over kv_lora_rank; MLA prefill runs
        # unabsorbed with the per-head qk_head_dim and v_dim.
        self._num_layers = model.num_layers
        self._kv_bytes_per_token_layer = attn.kv_elements_per_token * BYTES_PER_WEIGHT[model.kv_cache_dtype]
        self._prefill_flops_per_pair = 2.0 * attn.num_heads * (attn.qk_head_dim + attn.v_dim)
        if attn.is_mla:
            assert attn.kv_lora_rank and attn.qk_rope_head_dim
            absorbed = (attn.kv_lora_rank + attn.qk_rope_head_dim) + attn.kv_lora_rank
            self._decode_flops_per_pair = 2.0 * attn.num_heads * absorbed
        else:
            self._decode_flops_per_pair = self._prefill_flops_per_pair
        self._attention_flops_rate = hardware.sustained_flops_per_s("bf16")
        self._attention_launch_s = ATTENTION_KERNELS_PER_LAYER * self._launch_s

        # Dense GEMMs, in the model's weight dtype.
        self._dense_flops_rate = hardware.sustained_flops_per_s(model.weight_dtype)
        self._dense_groups = self._dense_gemm_groups(model)
        self._dense_launch_s = sum(g.repeats * g.kernels for g in self._dense_groups) * self._launch_s

        self._overhead_s = eff.iteration_overhead_s

    @staticmethod
    def _dense_gemm_groups(model: ModelSpec) -> tuple[_GemmGroup, ...]:
        """The model's non-expert weight matrices, grouped by how often they run per iteration."""
        attn = model.attention
        wbytes = model.weight_bytes_per_param
        if attn.is_mla:  # q (one GEMM, or q_a and q_b), kv_a, kv_b, output
            projection_kernels = (2 if attn.q_lora_rank else 1) + 3
        else:
            projection_kernels = GQA_PROJECTION_KERNELS
        groups = [
            _GemmGroup(model.attention_params * wbytes, 2.0 * model.attention_params, model.num_layers,
                       projection_kernels, rows_are_sequences=False),
            _GemmGroup(model.router_params * wbytes, 2.0 * model.router_params, model.num_moe_layers,
                       ROUTER_KERNELS, rows_are_sequences=False),
        ]
        if model.num_shared_experts:
            groups.append(_GemmGroup(model.shared_experts_params * wbytes, 2.0 * model.shared_experts_params,
                                     model.num_moe_layers, FFN_KERNELS, rows_are_sequences=False))
        if model.num_dense_layers:
            groups.append(_GemmGroup(model.dense_ffn_params * wbytes, 2.0 * model.dense_ffn_params,
                                     model.num_dense_layers, FFN_KERNELS, rows_are_sequences=False))
        lm_head_params = model.vocab_size * model.hidden_size
        groups.append(_GemmGroup(lm_head_params * wbytes, 2.0 * lm_head_params, 1, LM_HEAD_KERNELS,
                                 rows_are_sequences=True))
        return tuple(groups)

    # ----- components -----

    def attention_time_s(self, batch: BatchShape) -> float:
        """Attention core over all layers.

        Per layer, one kernel serves every row of the batch:
          bytes = kv_bytes_per_token * (sum(decode_context) + sum(prefill_context + chunk))
                  (each attended KV entry read once; Q, O and the new entries' writes are small beside it)
          FLOPs = decode_flops_per_pair * sum(decode_context)
                  + prefill_flops_per_pair * sum(chunk * (context + (chunk + 1) / 2))
                  (the chunk's i-th token attends to the context and to chunk tokens 1..i: causal)
          time  = max(bytes / bandwidth, FLOPs / (flops_fraction * bf16 peak)) + launch
        """
        chunks = batch.prefill_chunk_tokens
        contexts = batch.prefill_context_tokens
        decode_kv = float(batch.decode_context_tokens.sum())
        if chunks.size:
            c = chunks.astype(np.float64)
            prefill_kv = float((contexts + chunks).sum())
            prefill_pairs = float(np.dot(c, contexts + (c + 1.0) * 0.5))
        else:
            prefill_kv = prefill_pairs = 0.0
        layer_bytes = self._kv_bytes_per_token_layer * (decode_kv + prefill_kv)
        layer_flops = self._decode_flops_per_pair * decode_kv + self._prefill_flops_per_pair * prefill_pairs
        layer_s = max(layer_bytes / self._bandwidth, layer_flops / self._attention_flops_rate)
        return self._num_layers * (layer_s + self._attention_launch_s)

    def dense_time_s(self, batch: BatchShape) -> float:
        """Every non-expert GEMM: attention projections and router on every token of every layer, shared
        experts and dense-FFN layers likewise, the LM head once per sequence (one sampled position each).

        Per GEMM: time = max(weight_bytes / bandwidth, 2 * rows * params / (flops_fraction * peak)) + launch,
        activations' bytes left out (they are small beside the weights at serving batch sizes).
        """
        tokens = batch.num_tokens
        sequences = batch.num_sequences
        total = self._dense_launch_s
        for g in self._dense_groups:
            rows = sequences if g.rows_are_sequences else tokens
            total += g.repeats * max(g.weight_bytes / self._bandwidth, g.flops_per_row * rows / self._dense_flops_rate)
        return total

    def moe_time_s(self, expert_token_counts: np.ndarray) -> float:
        """Routed experts over all MoE layers, from tokens per expert per layer.

        Per layer: bytes = (experts with a token) * expert_bytes (each active expert's weights read once),
        FLOPs = 2 * expert_params * (token-expert assignments), time = max(bytes / bandwidth,
        FLOPs / (flops_fraction * peak in the expert dtype)) + launch. A layer with no tokens still launches
        its kernels and costs only that.
        """
        counts = np.asarray(expert_token_counts)
        if counts.shape != (self._num_moe_layers, self._num_experts):
            raise ValueError(
                f"expert_token_counts has shape {counts.shape}, expected "
                f"(num_moe_layers, num_experts) = ({self._num_moe_layers}, {self._num_experts})"
            )
        memory_s = np.add.reduce(counts > 0, axis=1) * self._expert_memory_s
        compute_s = np.add.reduce(counts, axis=1) * self._assignment_compute_s
        return float(np.maximum(memory_s, compute_s, out=memory_s).sum()) + self._moe_layers_launch_s

    # ----- the iteration -----

    def iteration(self, batch: BatchShape, expert_token_counts: np.ndarray) -> LatencyBreakdown:
        """Latency of one iteration that runs ``batch`` with ``expert_token_counts[layer, expert]`` tokens
        assigned to each routed expert of each MoE layer (rows may sum to less than tokens * top_k where a
        policy dropped assignments)."""
        if batch.num_tokens == 0:
            raise ValueError("an iteration with no tokens has nothing to cost")
        return LatencyBreakdown(
            attention_s=self.attention_time_s(batch),
            dense_s=self.dense_time_s(batch),
            moe_s=self.moe_time_s(expert_token_counts),
            communication_s=0.0,  # one GPU holds the whole model: nothing to exchange
            overhead_s=self._overhead_s,
        )

    # ----- memory -----

    @property
    def weight_bytes_per_gpu(self) -> float:
        """Weight bytes resident on each GPU: all of them, as the model runs on one GPU."""
        return self.model.weight_bytes

    def kv_cache_capacity_bytes(self, gpu_memory_utilization: float, activation_reserve_bytes: float) -> int:
        """Bytes left for the KV cache: memory_bytes * utilization - weights - activation reserve (as vLLM
        sizes its cache from ``gpu_memory_utilization``). Raises ``InputError`` when the weights do not fit."""
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if activation_reserve_bytes < 0:
            raise ValueError(f"activation_reserve_bytes must be non-negative, got {activation_reserve_bytes}")
        usable = self.hardware.memory_bytes * gpu_memory_utilization
        capacity = usable - self.weight_bytes_per_gpu - activation_reserve_bytes
        if capacity <= 0:
            raise InputError(
                "hardware",
                f"{self.model.name} weights {self.weight_bytes_per_gpu / 1e9:.1f} GB plus a "
                f"{activation_reserve_bytes / 1e9:.1f} GB activation reserve do not fit in {usable / 1e9:.1f} GB "
                f"({gpu_memory_utilization:.0%} of {self.hardware.name}'s {self.hardware.memory_bytes / 1e9:.1f} GB)"
                ", leaving nothing for the KV cache",
            )
        return int(capacity)
