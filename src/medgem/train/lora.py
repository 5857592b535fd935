"""LoRA adapters on our own modules: W x + (alpha / r) * B A dropout(x), with W frozen.

Why not `peft`: it imports transformers, which src/ never does. The layer is small, and owning it
lets the frozen base be one of the engine's int8/int4 linears (QLoRA-style): those kernels have no
autograd formula, so `_FrozenQuantized` supplies the input gradient from the dequantized weight.

Defaults follow the reference MedGemma recipe: every linear except the LM head ("all-linear"),
r=16, alpha=16, dropout 0.05. A is initialised like nn.Linear (Kaiming-uniform) and B at zero, so a
fresh adapter leaves the model's output unchanged. Adapters are saved as `adapter.safetensors`
(keys `<module path>.lora_A` / `.lora_B`) plus `adapter_config.json`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from medgem.errors import CheckpointError, ConfigError

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
ALL_LINEAR = "all-linear"
# Never adapted: the LM head, tied to the embedding matrix (262k rows) in every Gemma 3, and the
# engine's int8 embedding table that stores it when quantized.
EXCLUDED = ("lm_head", "table")


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str | list[str] = ALL_LINEAR  # "all-linear" or leaf names such as ["q_proj", "v_proj"]
    # Decoder layers to adapt (None: all). Adapting only the top layers also stops the backward pass
    # there, which is most of the saving on a CPU (PEFT calls this `layers_to_transform`).
    layers: list[int] | None = None
    modules: list[str] = field(default_factory=list)  # the module paths adapted (filled in by apply_lora)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class _FrozenQuantized(torch.autograd.Function):
    """y = base(x) for a frozen int8/int4 linear, with dL/dx = dL/dy @ W from the dequantized weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        weight = dense_weight(ctx.base).to(grad.dtype)
        return grad @ weight, None


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a linear-like module: nn.Linear, or an engine int8/int4 linear."""
    if isinstance(base, nn.Linear):
        return base.weight
    if hasattr(base, "dequantized"):
        return base.dequantized()
    # Any other x -> x @ W.T module (the int4 pack): its output for the identity is W.T.
    eye = torch.eye(base.in_features, dtype=torch.bfloat16, device=base.qweight.device)
    with torch.no_grad():
        return base(eye).float().T


def frozen_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x), differentiable in x even when base is a quantized kernel."""
    if isinstance(base, nn.Linear) or not torch.is_grad_enabled():
        return base(x)
    return _FrozenQuantized.apply(x, base)


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = frozen_linear(self.base, x)
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return out + (update * self.scaling).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A in fp32."""
        with torch.no_grad():
            return dense_weight(self.base).float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())


class FrozenLinear(nn.Module):
    """A quantized linear that is not adapted (e.g. the LM head) but must pass gradients back."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(self.base, x)


def _is_quantized(module: nn.Module) -> bool:
    return hasattr(module, "qweight") and hasattr(module, "in_features")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_quantized(module)


_DECODER_LAYER = re.compile(r"(?:^|language_model\.)layers\.(\d+)\.")


def target_paths(model: nn.Module, target_modules: str | list[str], layers: list[int] | None = None) -> list[str]:
    """Module paths to adapt: every linear but the LM head, or those whose leaf name is listed; with
    `layers`, only decoder layers with those indices (vision tower linears are then left alone)."""
    names = None if target_modules == ALL_LINEAR else set(
        target_modules.split(",") if isinstance(target_modules, str) else target_modules
    )

    def wanted(path: str) -> bool:
        if layers is None:
            return True
        m = _DECODER_LAYER.match(path)
        return m is not None and int(m.group(1)) in layers

    found = [
        path for path, module in model.named_modules()
        if _is_linear(module) and path.rsplit(".", 1)[-1] not in EXCLUDED
        and (names is None or path.rsplit(".", 1)[-1] in names) and wanted(path)
    ]
    if not found:
        raise ConfigError(f"no linear layer matches LoRA target modules {target_modules!r} (layers {layers})")
    return found


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze every parameter, then wrap the target linears in place; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    cfg.modules = cfg.modules or target_paths(model, cfg.target_modules, cfg.layers)
    for path in cfg.modules:
        try:
            base = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"the adapter targets {path!r}, which this model does not have") from None
        _set_module(model, path, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout))
    # Quantized linears left unadapted (the LM head, layers not targeted) must still pass gradients.
    for parent in list(model.modules()):
        if isinstance(parent, (LoRALinear, FrozenLinear)):
            continue
        for name, child in list(parent.named_children()):
            if _is_quantized(child) and name != "table":  # an int8 embedding reads its table directly
                setattr(parent, name, FrozenLinear(child))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for path, m in lora_modules(model).items():
        out[f"{path}.lora_A"], out[f"{path}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors into the model's LoRA layers; every layer must get both of its tensors."""
    modules = lora_modules(model)
    expected = {f"{p}.{k}" for p in modules for k in ("lora_A", "lora_B")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        what = f"lacks {missing[0]!r}" if missing else f"has unexpected tensor {extra[0]!r}"
        raise CheckpointError(f"adapter {source} {what}")
    with torch.no_grad():
        for path, m in modules.items():
            for name in ("lora_A", "lora_B"):
                param, value = getattr(m, name), state[f"{path}.{name}"]
                if param.shape != value.shape:
                    raise CheckpointError(
                        f"adapter {source}: {path}.{name} has shape {tuple(value.shape)}, the model needs "
                        f"{tuple(param.shape)} (a different base model or rank?)"
                    )
                param.copy_(value)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into a plain fp32 nn.Linear (a quantized base is dequantized first)."""
    for path, m in lora_modules(model).items():
        bias = getattr(m.base, "bias", None)
        merged = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=m.lora_A.device)
        merged.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        if bias is not None:
            merged.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        _set_module(model, path, merged)
    return model


def save_adapter(model: nn.Module, cfg: LoraConfig, folder: str | Path, base_model: str) -> None:
    """adapter.safetensors + adapter_config.json in `folder` (the caller makes it atomic)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**asdict(cfg), "base_model": base_model}, indent=1))


def read_adapter(folder: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor], str]:
    """(config, tensors, base model it was trained on) from a saved adapter folder."""
    folder = Path(folder)
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder} is not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        raw = json.loads(cfg_path.read_text())
        base = str(raw.pop("base_model", ""))
        cfg = LoraConfig(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{cfg_path} is not a valid adapter config: {exc}") from exc
    try:
        state = load_file(weights)
    except Exception as exc:  # safetensors raises its own error type on truncated files
        raise CheckpointError(f"{weights} is not a readable safetensors file (truncated?): {exc}") from exc
    return cfg, state, base


def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Apply a saved adapter to a freshly loaded base model."""
    cfg, state, _ = read_adapter(folder)
    apply_lora(model, cfg)
    load_lora_state_dict(model, state, str(folder))
    return cfg
