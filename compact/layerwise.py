"""Layerwise calibration (`--offload layerwise`): common act^2 scores without ever holding the model.

`score_layerwise` builds the model skeleton on the `meta` device from its config, then materializes one piece
at a time from the safetensors shards (read lazily with `safetensors.safe_open`):

1. the embedding (and the decoder's small non-layer modules: rotary embeddings); every calibration batch goes
   through the model's *own* decoder forward with the layers replaced by stubs that record what each layer
   receives (the embedded, for Gemma scaled, hidden states; the causal / sliding-window masks of
   `create_causal_mask` / `create_sliding_window_causal_mask`; the rotary cos/sin, per layer type for
   Gemma 3; the position ids) — so masks, positions and rotary tables are exactly the forward's own;
   the embedding is then freed;
2. each decoder layer in turn: `to_empty` + load its tensors, run every batch through it with the recorded
   arguments, keeping the hidden states where they fit (compact.streams: device, host or disk), score its MLP
   with the same `ChannelScorer` fused path as `compact.scoring` (`compact_kernels.glu_and_score`, weights =
   kept-token table * attention mask, float64 accumulators), free the layer, go on.

Peak memory: one layer + the hidden states (+ the embedding, during step 1 only). The final norm and the LM
head are never loaded. Scores equal `compact.scoring.score_channels` on the loaded model (same batch size;
bit-identical in the tests). Measured on the CPU (tests/test_layerwise.py): a 16-layer fp32 Llama of 258 MiB
(16 MiB per layer), 4 sequences of 32-128 tokens: peak RSS 47-55 MiB above the baseline layerwise, 259-293 MiB
loaded whole.

Arithmetic for Llama-3.1-70B (80 layers, hidden 8192, intermediate 28672, 64/8 heads of 128, vocab 128256,
untied head) -- ARITHMETIC, NOT MEASURED:

- per layer: attention q,o 2 x 8192^2 + k,v 2 x 8192 x 1024 = 150,994,944; MLP 3 x 8192 x 28672 =
  704,643,072; norms 16,384; total 855,654,400 parameters = 1.71 GB in bf16 (1.59 GiB).
- embedding (and the head, each) 128256 x 8192 = 1,050,673,152 = 2.10 GB bf16; whole model 70.55e9
  parameters = 141.1 GB bf16: more than an 80 GB H100, and an H200 (141 GB) has no room left for activations.
- hidden states for 16 x 2048 = 32,768 tokens: 32768 x 8192 x 2 B = 0.54 GB (512 MiB) bf16. Per batch of one
  2048-token sequence the MLP's gate/up/h are 3 x 2048 x 28672 x 2 B = 0.35 GB.
- layerwise peak on the GPU: ~1.7 GB layer + 0.54 GB hidden states + ~0.5 GB activations (+ the 2.1 GB
  embedding during step 1 only): ~3-5 GB instead of > 141 GB.
- compute: 2 x 68.45e9 (layer parameters) x 32,768 tokens = 4.5e15 FLOP (+2-4% for the attention scores at 2048).
  At the H100/H200 dense bf16 peak of ~989 TFLOP/s that is 4.5 s; at a realistic 50-60% ~8-9 s.
- weight traffic: each batch reads every layer's weights from HBM once: 137 GB / 3.35 TB/s (H100) = 41 ms or
  / 4.8 TB/s (H200) = 29 ms per batch, x 16 batches = 0.5-0.7 s; compute bound (2048 tokens per batch is
  ~2048 FLOP per weight byte, far above the ~300 FLOP/B ridge).
- loading the 141 GB once: from host memory / page cache over PCIe 5 x16 (~50 GB/s) ~3 s, PCIe 4 (~25 GB/s)
  ~6 s; from one NVMe drive (3-7 GB/s) 20-47 s; a single-threaded CPU copy out of the safetensors mmap
  (~5-10 GB/s) adds 14-28 s, since layers are loaded and computed one after the other (no prefetch yet).
  So loading, not FLOPs, dominates: expect ~0.5-1 min end to end on one H100/H200 (the paper reports 2 min 17 s
  for 70B on an A100).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import engine, loading, models
from .shards import open_shards, read_tensors
from .engine import Batch, EngineOptions, record_batches
from .streams import Streams
from .memory import trim_host_memory
from .models import prefix_of
from .scoring import ScoringOptions

# ------------------------------------------------------------------------------------------- materializing

def materialize(module: nn.Module, prefix: str, files: dict[str, Path], device, init_owner: nn.Module) -> None:
    """Allocate `module` on `device` and fill it: parameters and persistent buffers from the checkpoint
    (cast to the skeleton's dtype, as from_pretrained does), non-persistent buffers (rotary inverse
    frequencies, Gemma's embedding scale) by the model's own `_init_weights`, as from_pretrained does."""
    names = {key: prefix + key for key in module.state_dict(keep_vars=True)}
    missing = [full for full in names.values() if full not in files]
    if missing:
        some = ", ".join(sorted(files)[:4])
        raise ValueError(f"the checkpoint lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                       f"(it holds e.g. {some}); --offload layerwise needs the standard tensor names")
    module.to_empty(device=device)
    targets = dict(module.named_parameters())
    targets.update(module.named_buffers())
    key_of = {full: key for key, full in names.items()}
    with torch.no_grad():
        for full, source in read_tensors(files, names.values()):
            target = targets[key_of[full]]
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(f"{full}: checkpoint shape {tuple(source.shape)}, the config implies "
                                 f"{tuple(target.shape)}")
            target.copy_(source)  # host -> device and the cast to the skeleton's dtype, one tensor at a time
            target._is_hf_initialized = True  # transformers' init functions leave it alone
            del source
        for sub_name, sub in module.named_modules():
            if not sub._non_persistent_buffers_set:
                continue
            buffers = {n: getattr(sub, n) for n in sub._non_persistent_buffers_set if getattr(sub, n) is not None}
            for buf in buffers.values():  # poison first: a buffer `_init_weights` does not set shows up below
                if buf.is_floating_point():
                    buf.fill_(float("nan"))
            init_owner._init_weights(sub)
            for n, buf in buffers.items():
                if buf.is_floating_point() and torch.isnan(buf).any():
                    raise RuntimeError(f"{prefix}{sub_name + '.' if sub_name else ''}{n}: this model's _init_weights "
                                       f"does not set this non-persistent buffer; --offload layerwise cannot "
                                       f"rebuild it ({type(sub).__name__})")


def release(module: nn.Module) -> None:
    """Free a module's storage (back to the meta device) and hand the freed host memory back to the system."""
    module.to_empty(device="meta")
    trim_host_memory()




def _layer_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in layer.state_dict().values())


# ------------------------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class Placement:
    """Where `score_layerwise` computes: `device`, in `dtype` (checkpoint tensors are cast to it, as
    from_pretrained(dtype=...) does). The hidden states between layers live where they fit (compact.streams)."""

    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32


class Shards:
    """The layers of a safetensors checkpoint, materialized one at a time (the engine's offloaded source): the
    skeleton on the meta device, the embedding and small decoder modules only while batches are recorded."""

    def __init__(self, model_dir, placement: Placement | None = None):
        self.placement = placement or Placement()
        self.model_dir = model_dir
        path = loading.locate(str(model_dir))
        self.config, self.files, self.model = open_shards(path, "layerwise scoring", model_dir,
                                                              self.placement.dtype)
        self.device = torch.device(self.placement.device)
        self.dtype = self.placement.dtype
        self.decoder = models.decoder_of(self.model)
        self.prefix = prefix_of(self.model, self.decoder)
        self.reserve = 3 * _layer_bytes(self.decoder.layers[0])  # device room the streams leave for layers

    @contextmanager
    def embedded(self) -> Iterator[None]:
        """The embedding and the decoder's small modules (rotary) materialized inside the block."""
        small = [(n, c) for n, c in self.decoder.named_children() if n not in ("layers", "norm")]
        try:
            for name, child in small:
                materialize(child, f"{self.prefix}{name}.", self.files, self.device, self.decoder)
            yield
        finally:
            for _, child in small:
                release(child)

    def record(self, input_ids, attention_mask, batch_size: int, streams: Streams) -> list[Batch]:
        """Every batch's inputs (inside `embedded`)."""
        return record_batches(self.decoder, input_ids, attention_mask, batch_size=batch_size, device=self.device,
                              streams=streams)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        layer = self.decoder.layers[i]
        materialize(layer, f"{self.prefix}layers.{i}.", self.files, self.device, self.decoder)
        try:
            yield layer
        finally:
            release(layer)


def score_layerwise(model_dir, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    options: ScoringOptions | None = None,
                    placement: Placement | None = None) -> dict[str, torch.Tensor]:
    """{"model.layers.{i}.mlp": float64 [I]} like `compact.scoring.score_channels`, loading one layer at a time.

    `model_dir`: a Hugging Face directory with safetensors (or a cached hub id). `options`: the token weighting,
    batch size, scoring path and progress bar, as `score_channels` takes them. The per-batch masks and rotary
    tables stay on the compute device. Scores are returned on the compute device; they equal `score_channels`
    on the loaded model with the same batch size.
    """
    options = options or ScoringOptions()
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [sequences, length], got shape {tuple(input_ids.shape)}")
    if options.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {options.batch_size}")
    return engine.run(Shards(model_dir, placement), input_ids, attention_mask, EngineOptions(options)).scores
