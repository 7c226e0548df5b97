"""Model-family adapters, one table keyed by `config.model_type`: where the MLPs are and how they compute."""
from __future__ import annotations

import hashlib
import math
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """What the driver must know about one architecture family."""

    name: str
    act_attr: str               # config attribute holding the MLP activation name
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj, gate half first (only the methods below read it)
    scaled_embedding: bool = False  # Gemma: embeddings scaled by sqrt(hidden) inside the embedding module

    def projections(self, mlp: nn.Module) -> list[nn.Module]:
        """The MLP's linear layers, down_proj last."""
        first = [mlp.gate_up_proj] if self.fused_gate_up else [mlp.gate_proj, mlp.up_proj]
        return [*first, mlp.down_proj]

    def gate_up(self, mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MLP's (gate, up) projections of x; (fused [..., 2I], None) for a fused gate_up_proj, the form
        compact_kernels' glu ops take."""
        if self.fused_gate_up:
            return mlp.gate_up_proj(x), None
        return mlp.gate_proj(x), mlp.up_proj(x)

    def gate_up_weights(self, mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The (gate, up) weights, [I, D] each (the halves of a fused gate_up_proj)."""
        if self.fused_gate_up:
            return mlp.gate_up_proj.weight.chunk(2, dim=0)
        return mlp.gate_proj.weight, mlp.up_proj.weight

    def channel_rows(self, index: torch.Tensor, intermediate: int) -> dict[str, torch.Tensor]:
        """{projection: its rows that hold channels `index`} for the gate and up projections (both halves of a
        fused gate_up_proj); down_proj keeps the same `index` as columns."""
        if self.fused_gate_up:
            return {"gate_up_proj": torch.cat([index, index + intermediate])}
        return {"gate_proj": index, "up_proj": index}

    def glu_into(self, mlp: nn.Module, x2: torch.Tensor, activation: str,
                 buffer: Callable[[str, tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
        """h = act(gate(x2)) * up(x2) for 2-D x2 in work buffers (`buffer(slot, shape)`: a reusable tensor of x2's
        dtype), with the model's own values: the GEMMs F.linear runs, written with `out=`, and the activation
        in place on a separate gate, or from a fused gate_up's strided gate half into its own buffer (as
        Hugging Face computes each)."""
        rows = x2.shape[0]
        if self.fused_gate_up:
            gate_up = _linear_into(mlp.gate_up_proj, x2, buffer("gate_up", (rows, mlp.gate_up_proj.out_features)))
            gate, up = gate_up.chunk(2, dim=-1)
            h = buffer("h", tuple(gate.shape))
        else:
            gate = h = _linear_into(mlp.gate_proj, x2, buffer("gate", (rows, mlp.gate_proj.out_features)))
            up = _linear_into(mlp.up_proj, x2, buffer("up", tuple(gate.shape)))
        if activation == "silu":
            torch.ops.aten.silu.out(gate, out=h)
        else:
            torch.ops.aten.gelu.out(gate, approximate="tanh", out=h)
        return h.mul_(up)


def _linear_into(linear: nn.Linear, x2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """linear(x2) for 2-D x2 written into `out`: the same mm/addmm F.linear runs, without a fresh output."""
    if linear.bias is None:
        return torch.mm(x2, linear.weight.t(), out=out)
    return torch.addmm(linear.bias, x2, linear.weight.t(), out=out)


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama 2 / 3.x, SmolLM, TinyLlama", "hidden_act"),
    "mistral": Family("Mistral", "hidden_act"),
    "qwen2": Family("Qwen2 / Qwen2.5", "hidden_act"),
    "qwen3": Family("Qwen3", "hidden_act"),
    "gemma": Family("Gemma", "hidden_act", scaled_embedding=True),
    "gemma2": Family("Gemma 2", "hidden_activation", scaled_embedding=True),
    "gemma3_text": Family("Gemma 3 (text)", "hidden_activation", scaled_embedding=True),
    "phi3": Family("Phi-3", "hidden_act", fused_gate_up=True),
}

# Hugging Face activation names -> the kernel's activation.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def check_prunable(config, source) -> None:
    """A supported family (UnsupportedModelError otherwise) with plain floating-point weights."""
    family_of(config)
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", "?")
        method = getattr(method, "value", method)  # transformers' QuantizationMethod enum: its name, "gguf"
        how = ("load the .gguf file with compact.load(path), which dequantizes it" if method == "gguf"
               else "load and save it unquantized first")
        raise ValueError(f"model {str(source)!r} is quantized ({method}); compact prunes unquantized checkpoints: "
                         f"{how}")


def fingerprint(config) -> dict[str, str]:
    """What a scores file must match: the architecture and FFN shape (not the vocabulary, which a prune may cut)."""
    return {f"model_{k}": str(getattr(config, k, None))
            for k in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size")}


class UnsupportedModelError(ValueError):
    """A model this package cannot prune; the message says which ones it can."""


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def activation_of(config) -> str:
    """The kernel activation ("silu" / "gelu_tanh") of the model's MLPs."""
    name = getattr(config, family_of(config).act_attr, None)
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"MLP activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) without the LM head."""
    family_of(model.config)
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def mlps(model: nn.Module) -> dict[str, nn.Module]:
    """{"model.layers.{i}.mlp": module} in layer order: the names of the scores file."""
    return {f"model.layers.{i}.mlp": layer.mlp for i, layer in enumerate(decoder_of(model).layers)}


def normalizes_mlp_output(model: nn.Module) -> bool:
    """Whether the family normalizes the MLP output before the residual add (Gemma 2/3)."""
    return hasattr(decoder_of(model).layers[0], "post_feedforward_layernorm")


def intermediate_size(model: nn.Module) -> int:
    return next(iter(mlps(model).values())).down_proj.in_features


def is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


@dataclass(frozen=True)
class Identity:
    """Which model a decision was made for: its vocabulary rows and FFN channels, a digest of every parameter's name
    and shape, and a digest of 16 evenly spaced values of each, rounded to bfloat16 (so a cast or a move to another
    device is the same model; None for a skeleton on the meta device, whose values are in its files)."""

    vocab: int
    intermediate: int
    shapes: str
    values: str | None

    @classmethod
    def of(cls, model: nn.Module) -> Identity:
        shapes, values, samples = hashlib.sha256(), hashlib.sha256(), []
        for name, p in model.named_parameters():
            shapes.update(f"{name}{tuple(p.shape)};".encode())
            if not p.is_meta and p.numel():
                flat = p.detach().reshape(-1)
                # integer steps: a float32 linspace rounds numel - 1 up past the end above 2^24 values
                samples.append(flat[torch.arange(16, device=flat.device) * (flat.numel() - 1) // 15])
        if samples:
            values.update(torch.cat([s.to(torch.bfloat16) for s in samples]).view(torch.int16).cpu().numpy())
        return cls(model.get_input_embeddings().num_embeddings, intermediate_size(model), shapes.hexdigest()[:16],
                   values.hexdigest()[:16] if samples else None)

    def check(self, model: nn.Module) -> None:
        """ValueError unless `model` is the one this identity describes (its values compared where both hold them)."""
        other = Identity.of(model)
        if (other.vocab, other.intermediate) != (self.vocab, self.intermediate):
            raise ValueError(f"this decision was made for a model of {self.vocab} tokens and {self.intermediate} FFN "
                             f"channels per layer; this one has {other.vocab} and {other.intermediate} (was the "
                             "decision already applied to it?)")
        if other.shapes != self.shapes or None not in (self.values, other.values) and other.values != self.values:
            raise ValueError("this decision was made for another model (its parameters' shapes or values differ): "
                             "decide on the model you cut")


SPECIAL_ID_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")  # config token ids


def config_token_ids(model: nn.Module) -> list[int]:
    """The token ids the config or the generation config names (SPECIAL_ID_ATTRS): kept whatever the vocabulary
    cut, and renumbered by the same list (compact.slicing)."""
    ids = []
    for config in (model.config, getattr(model, "generation_config", None)):
        for attr in SPECIAL_ID_ATTRS:
            value = getattr(config, attr, None)
            ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    return ids


def parameter_counts(model: nn.Module, shapes: dict | None = None, tied: bool | None = None) -> dict[str, int]:
    """Parameters by part: embedding, head (0 when tied), attention, ffn, other (norms), total. From the model's
    own parameters, or from `shapes` ({checkpoint tensor name: shape}, e.g. of a meta skeleton's files)."""
    if shapes is None:
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # a tied matrix once
    tied = is_tied(model) if tied is None else tied
    params = {name for name, _ in model.named_parameters()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb_prefix = prefix_of(model, embedding)
    head_prefix = prefix_of(model, head) if head is not None else None
    layer_prefixes = [(prefix_of(model, layer.self_attn), prefix_of(model, layer.mlp)) for layer in decoder_of(model).layers]
    counts = {"embedding": 0, "head": 0, "attention": 0, "ffn": 0, "total": 0}
    for name, shape in shapes.items():
        if name not in params:
            continue
        n = math.prod(shape)
        counts["total"] += n
        if name.startswith(emb_prefix):
            counts["embedding"] += n
        elif head_prefix is not None and name.startswith(head_prefix):
            counts["head"] += 0 if tied else n
        elif any(name.startswith(a) for a, _ in layer_prefixes):
            counts["attention"] += n
        elif any(name.startswith(f) for _, f in layer_prefixes):
            counts["ffn"] += n
    counts["other"] = counts["total"] - sum(counts[k] for k in ("embedding", "head", "attention", "ffn"))
    return counts


def prefix_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise ValueError("module is not part of the model")


@contextmanager
def patched_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """module.forward replaced by `forward(module, x)` on this instance inside the block, restored after."""
    saved = module.__dict__.get("forward")
    module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved
