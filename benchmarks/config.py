"""What every benchmark is sized by: BenchConfig, and the constants the benchmark families share."""

from __future__ import annotations

from dataclasses import dataclass, replace

L1_COEFF = 2.0
"""The params default; only the loss value depends on it, not the work done."""
BENCH_LR = 1e-6
"""Learning rate of the repeated step benchmark: tiny, so weights (and sparsity) barely drift."""
RAW_SCALE = 3.0
"""Per-dimension std of the synthetic stores' raw rows (the store's norm factor rescales them)."""
STORE_LAYER = 0
SHORT = {"bfloat16": "bf16", "float32": "fp32"}


@dataclass
class BenchConfig:
    """Sizes of every benchmark; `quick()` shrinks them all."""

    model: str = "smollm2-135m"
    """Model spec (packaged name or HF directory) for the harvest and end-to-end benchmarks."""
    layer: str | int = "middle"
    """Layer read (resid_pre of this block), as in params files."""
    harvest_seqs: int = 16
    """Sequences per forward pass (also the harvest batch size end to end)."""
    seq_len: int = 256
    """Tokens per sequence."""
    repeats: int = 3
    """Timed repeats per measurement (median reported), after one warm-up."""
    harvest_repeats: int = 7
    """Timed repeats of the harvest benchmark (cheap, and its limit ratio is an acceptance figure)."""
    d_a: int = 576
    """Width of model A in the training-step benchmark (SmolLM2-135M)."""
    d_b: int = 640
    """Width of model B in the training-step benchmark (Gemma-3-270M)."""
    dict_size: int = 16384
    """Latents in the training-step benchmark (the paper's 2**14)."""
    batch_size: int = 4096
    """Tokens per training step in the training-step benchmark."""
    trained_l0: int = 128
    """Active latents per token for the sparse-decoder comparison (a trained crosscoder's L0)."""
    threshold_l0s: tuple[int, ...] = (32, 64, 128, 256, 512)
    """Active latents per token at which the sparse and dense steps are compared at the default run's
    shape (run_matmul: batch, d, H): where the sparse step stops paying is train.sparse_below."""
    distill_seqs: int = 8
    """Sequences per distillation step in the student-training benchmark."""
    distill_len: int = 256
    """Tokens per sequence in the student-training benchmark (the default run's corpus.seq_len)."""
    distill_params: str = "distill-kl-vs-jacobian"
    """Params file whose distill section (with its fp32_cpu part where that applies) sets the benchmarked
    students: start blocks, objective weights, the Jacobian term's directions and sequences. "": the
    DistillConfig defaults (a teacher too small for the default run's start, as in the tests)."""
    allocator_rounds: int = 2
    """Child processes per side of the allocator comparison (alternating), each timing `repeats` steps."""
    compile: bool = True
    """Also time torch.compile of the loss (costs tens of seconds of compilation)."""
    e2e_tokens: int = 20_000
    """Harvested tokens end to end."""
    e2e_steps: int = 100
    """Training steps end to end."""
    e2e_batch: int = 1024
    """Tokens per training step end to end and in the growth benchmarks."""
    e2e_dict: int = 4096
    """Latents end to end and in the growth benchmarks."""
    growth_steps: tuple[int, ...] = (50, 100, 200)
    """Training budgets (steps) whose seconds per step should be constant."""
    store_rows: tuple[int, int] = (100_000, 800_000)
    """Rows of the small and the large synthetic store for the peak-memory comparison."""
    memory_steps: int = 100
    """Training steps run on each store for the peak-memory comparison."""
    run_matmul: tuple[int, int, int] = (512, 576, 4096)
    """(batch, d, H) of the default run's encoder matmul (SmolLM2's 576, train.batch_size 512,
    dict_size 4096), timed in bf16 and fp32; the paper shape (batch_size, d_a, dict_size) too."""
    matmul_call_s: float = 0.2
    """A timed matmul call repeats the product until it takes about this long (steadier timings)."""
    bf16_budget_s: float = 60.0
    """Where bf16 is not the chosen precision (it is emulated): a bf16-only measurement whose single
    call is estimated (from the timed bf16 matmul) to take longer than this is recorded as not timed."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("harvest_seqs", "seq_len", "repeats", "harvest_repeats", "d_a", "d_b", "dict_size",
                     "batch_size", "trained_l0", "e2e_tokens", "e2e_steps", "e2e_batch", "e2e_dict", "memory_steps",
                     "distill_seqs", "distill_len", "allocator_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"bench.{name}: {value!r} is not a positive integer")
        if self.seq_len < 2:
            raise ValueError(f"bench.seq_len: {self.seq_len} must be at least 2 (position 0 is skipped)")
        if self.trained_l0 > self.dict_size:
            raise ValueError(f"bench.trained_l0: {self.trained_l0} exceeds dict_size {self.dict_size}")
        if len(self.growth_steps) < 2 or list(self.growth_steps) != sorted(set(self.growth_steps)) \
                or min(self.growth_steps) <= 0:
            raise ValueError(f"bench.growth_steps: {self.growth_steps!r} must be >= 2 increasing positive ints")
        if len(self.store_rows) != 2 or not 0 < self.store_rows[0] < self.store_rows[1]:
            raise ValueError(f"bench.store_rows: {self.store_rows!r} must be (small, large), 0 < small < large")
        if len(self.run_matmul) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                for v in self.run_matmul):
            raise ValueError(f"bench.run_matmul: {self.run_matmul!r} must be three positive ints (batch, d, H)")
        if not self.threshold_l0s or not all(isinstance(v, int) and 0 < v < self.run_matmul[2]
                                             for v in self.threshold_l0s):
            raise ValueError(f"bench.threshold_l0s: {self.threshold_l0s!r} must be positive ints below the "
                             f"default shape's H ({self.run_matmul[2]})")
        for name in ("matmul_call_s", "bf16_budget_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"bench.{name}: {value!r} is not a positive number")

    def quick(self) -> "BenchConfig":
        """The same benchmarks at sizes that run in a minute or two on two cores."""
        return replace(self, harvest_seqs=8, dict_size=4096, batch_size=2048, trained_l0=64, compile=False,
                       threshold_l0s=(32, 128, 512), distill_seqs=2, distill_len=64, allocator_rounds=1,
                       e2e_tokens=2000, e2e_steps=10, e2e_batch=512, e2e_dict=2048, growth_steps=(5, 10, 20),
                       store_rows=(70_000, 210_000), memory_steps=10)

