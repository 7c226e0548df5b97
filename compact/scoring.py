"""Channel scoring: common act^2 per FFN channel, the fused kernel path and the plain hook path.

`ChannelScorer` is a context manager a user's own calibration loop runs under; `score_channels` drives it
over a tensor of token ids, batch by batch, running only the decoder (no LM head, no logits).

Speed (see bench/calibration.py): `run_scorer` calls the decoder itself, with no hooks, under
`torch.inference_mode`, inside `ChannelScorer.driven(stop_after=<last MLP>)`: `StopForward` is raised right
after the last MLP has scored and caught in `run_scorer`, so the last down_proj, the final norm, the LM head
and the logits never run. On the CPU the fused path runs each MLP with reusable work buffers (gate/up GEMMs
written into them with `out=`, act-and-mul in place: `models.Family.glu_into`; the squares in place, by
`compact_kernels.reference.squares`): a fresh large tensor is fresh pages from the OS, and touching those
costs about as much as the elementwise work itself. The values are the model's own (same ops, same layouts),
so scores match the hook path bit for bit on the same input.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

import compact_kernels as ck
from compact_kernels import reference

from . import models
from .options import PATHS
from .progress import bar as progress_bar
from .sums import Sums

_ACTIVE = "_compact_scorer_active"  # set on the decoder while a ChannelScorer is entered


@dataclass
class ScoringOptions:
    """What `score_channels` takes beside the model and the data, for drivers that pass it on (layerwise):
    the token weighting, the batch size, the scoring `path` (auto, fused or hooks) and the progress bar."""

    keep_token_ids: Iterable[int] | None = None
    token_weights: torch.Tensor | None = None  # a float [vocab] table
    batch_size: int = 1
    path: str = "auto"
    progress: bool | None = None


class StopForward(Exception):
    """Raised right after the MLP named by `ChannelScorer.driven(stop_after=...)` has scored: the driver catches it
    around its forward call (the rest of the forward would not change the sums)."""


class _Scratch:
    """Work buffers reused across layers and batches (CPU fast path), one flat buffer per slot, grown on demand."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(slot)
        # An inference tensor cannot be written outside inference mode: reallocate when the mode changed.
        if (buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device
                or (buf.is_inference() and not torch.is_inference_mode_enabled())):
            self._buffers.pop(slot, None)  # free the old one first: no double peak
            buf = self._buffers[slot] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


def _plain_linear(module) -> bool:
    """An nn.Linear whose call is exactly F.linear: no subclass, no instance forward, no hooks."""
    return (type(module) is nn.Linear and "forward" not in vars(module)
            and not module._forward_hooks and not module._forward_pre_hooks)


def _no_global_hooks() -> bool:
    mod = torch.nn.modules.module
    return not any(getattr(mod, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_module_registration_hooks"))


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no device argument
        return torch.is_autocast_enabled()


def _scoring_path(path: str | None, backend: str | None) -> str:
    """"fused" or "hooks" from `path=` (None: "auto") or its deprecated alias `backend=` (a DeprecationWarning)."""
    if backend is not None:
        if path is not None:
            raise TypeError("give path= (the scoring path) or backend= (its deprecated name), not both")
        warnings.warn("backend= (the scoring path) is deprecated: pass path= instead; \"backend\" names the kernel "
                      "backend of compact_kernels (triton or torch)", DeprecationWarning, stacklevel=3)
        path = backend
    path = "auto" if path is None else path
    if path not in PATHS:
        raise ValueError(f"path (the scoring path) must be one of {', '.join(PATHS)}, got {path!r}")
    return "fused" if path == "auto" else path


def keep_table(vocab_size: int, keep_token_ids, device=None) -> torch.Tensor:
    """float32 [vocab] with 1 at the kept ids, 0 elsewhere."""
    table = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    table[_kept_ids(keep_token_ids, vocab_size).to(device)] = 1.0
    return table


def _kept_ids(keep_token_ids, vocab_size: int) -> torch.Tensor:
    """keep_token_ids as int64 [N]: integer ids in [0, vocab_size), never a boolean mask, floats or negatives."""
    try:
        ids = torch.as_tensor(keep_token_ids if hasattr(keep_token_ids, "dtype") else list(keep_token_ids))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"keep_token_ids must be a sequence of integer token ids ({e})") from None
    if ids.dtype == torch.bool:
        raise ValueError("keep_token_ids must be token ids, not a boolean mask: pass mask.nonzero().flatten(), "
                         "the ids the mask marks")
    if ids.dim() != 1:
        raise ValueError(f"keep_token_ids must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        return ids.long()
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"keep_token_ids must be integer token ids, got {_dtype_name(ids)} values "
                         f"(e.g. {ids[0].item()})")
    low, high = ids.min().item(), ids.max().item()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"keep_token_ids must be in [0, {vocab_size}) (the vocabulary size), got "
                         f"{low if low < 0 else high}")
    return ids.long()


class ChannelScorer:
    """Accumulates common act^2 for every MLP while the model runs; restores the model exactly on exit.

        with ChannelScorer(model, keep_token_ids=kept) as s, torch.no_grad():
            for batch in loader:
                model(**batch)
        s.scores  # {"model.layers.{i}.mlp": float64 [I]}

    A position's weight is table[input_id] (1 for ids in `keep_token_ids`, 0 otherwise; or any float
    `token_weights` table of vocabulary size) times its attention mask; all ones when neither is given.
    `path` is the scoring path: "fused" (= "auto", the default) replaces each MLP's act-and-mul by
    `glu_and_score`; "hooks" is the plain forward-pre-hook path on `down_proj`, the reference the fused path is
    checked against (`backend=` is its deprecated name). `plain=True` also accumulates unweighted act^2
    (attention mask only) in `plain_scores`, in the same pass; `gram=True` the weighted Gram matrix of
    down_proj's input, `grams[name]` = sum_t w_t h_t h_t^T (float64 [I, I], its diagonal the scores), which
    compact.repair solves with. The sums live in `sums` (a `compact.sums.Sums`).
    """

    def __init__(self, model: nn.Module, *, keep_token_ids=None, token_weights=None, path: str | None = None,
                 plain: bool = False, gram: bool = False, backend: str | None = None):
        self.path = _scoring_path(path, backend)
        if keep_token_ids is not None and token_weights is not None:
            raise ValueError("give keep_token_ids or token_weights, not both")
        self.model = model
        self.family = models.family_of(model.config)
        self.activation = models.activation_of(model.config)
        self.mlps = models.mlps(model)
        embedding = model.get_input_embeddings()
        device, vocab = embedding.weight.device, embedding.num_embeddings
        self.table = None
        if keep_token_ids is not None:
            self.table = keep_table(vocab, keep_token_ids, device)
        elif token_weights is not None:
            self.table = torch.as_tensor(token_weights, dtype=torch.float32, device=device)
            if self.table.shape != (vocab,):
                raise ValueError(f"token_weights must have shape ({vocab},), got {tuple(self.table.shape)}")
        self.sums = Sums(self.mlps, models.intermediate_size(model), device, plain=plain, gram=gram)
        self._weights: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._undo: list = []
        self._scratch = _Scratch()
        self._stop_after: str | None = None  # set by driven() only

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        return self.sums.scores

    @property
    def plain_scores(self) -> dict[str, torch.Tensor] | None:
        return self.sums.plain

    @property
    def grams(self) -> dict[str, torch.Tensor] | None:
        return self.sums.grams

    @property
    def tokens(self) -> float:
        """Sum of the token weights seen so far: the calibration mass behind the scores."""
        return float(self.sums.mass)

    def set_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Token weights for the next forward; the decoder pre-hook calls it (call it yourself with inputs_embeds,
        or under `driven`)."""
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        self._mask = None if attention_mask is None else attention_mask.to(torch.float32)
        self._weights = self.weights_for(input_ids, attention_mask)
        # float32 per batch (exact for 0/1 weights below 2^24 tokens), float64 across batches.
        self.sums.mass += input_ids.numel() if self._weights is None else self._weights.sum().to(torch.float64)

    def weights_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The token weights of a batch (float32 like input_ids; None: all ones), without counting them."""
        if self.table is None:
            return None if attention_mask is None else attention_mask.to(torch.float32)
        return ck.token_weights(input_ids, self.table, attention_mask)

    def _decoder_pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if input_ids is not None:
            self.set_batch(input_ids, mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)
        elif self._weights is None and self.table is not None:
            raise ValueError("ChannelScorer needs input_ids in the forward call (or set_batch before each forward)")

    def _buffered(self, mlp: nn.Module, x: torch.Tensor) -> bool:
        """Whether the CPU buffer path applies: plain-torch kernels, no autograd/autocast, plain nn.Linear
        projections of x's dtype and device, no hooks."""
        if x.device.type != "cpu" or torch.is_grad_enabled() or _autocast_on("cpu"):
            return False
        if ck.backend_for(x) != "torch" or x.dim() < 2:
            return False
        projections = self.family.projections(mlp)
        return (all(_plain_linear(p) for p in projections) and _no_global_hooks()
                and all(p.weight.dtype == x.dtype and p.weight.device == x.device for p in projections))

    def _glu_and_score(self, name: str, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """h with its common act^2 added, by compact_kernels' fused op (the reference where autograd needs h)."""
        gate, up = self.family.gate_up(mlp, x)
        if torch.is_grad_enabled() and gate.requires_grad:  # keep autograd intact: plain ops, detached score
            h = reference.glu_and_score(gate, up, activation=self.activation)
            reference.channel_scores(h.detach(), self._weights, out=self.sums.scores[name])
            return h
        return ck.glu_and_score(gate, up, activation=self.activation, weights=self._weights,
                                scores=self.sums.scores[name])

    def _add_squares(self, name: str, h: torch.Tensor) -> None:
        """The buffer path's act^2 sums (common and plain) from one squaring of h, in place (float32; h is spent)
        or into a float32 buffer, by the steps of reference.channel_scores."""
        buffer = h if h.dtype == torch.float32 else self._scratch.get("sq", tuple(h.shape), torch.float32, h.device)
        sq = reference.squares(h, out=buffer)
        reference.weighted_sum(sq, self._weights, out=self.sums.scores[name])
        if self.sums.plain is not None:
            reference.weighted_sum(sq, self._mask, out=self.sums.plain[name])

    def _buffered_glu(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """h as 2-D [T, I] in reusable buffers (scored later, by _add_squares)."""
        ck.check_weights(self._weights, x.shape[:-1], x.device)
        buffer = functools.partial(self._scratch.get, dtype=x.dtype, device=x.device)
        return self.family.glu_into(mlp, x.reshape(-1, x.shape[-1]), self.activation, buffer)

    def _fused_mlp(self, name: str, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The fused path's MLP forward: h = act(gate(x)) * up(x) scored where it is computed, then down_proj(h).
        On the CPU buffer path (`_buffered`) h is squared in place once down_proj and the Gram have read it."""
        buffered = self._buffered(mlp, x)
        h = self._buffered_glu(mlp, x) if buffered else self._glu_and_score(name, mlp, x)
        out = None if name == self._stop_after else mlp.down_proj(h)
        self.sums.add_gram(name, h, self._weights)
        if buffered:
            self._add_squares(name, h)
        elif self.sums.plain is not None:
            ck.channel_scores(h.detach(), self._mask, out=self.sums.plain[name])
        if out is None:
            raise StopForward(name)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _down_pre_hook(self, name: str):
        """The hooks path: down_proj's input scored by compact_kernels' reference, before down_proj runs."""
        def hook(module, args):
            h = args[0].detach()
            reference.channel_scores(h, self._weights, out=self.sums.scores[name])
            if self.sums.plain is not None:
                reference.channel_scores(h, self._mask, out=self.sums.plain[name])
            self.sums.add_gram(name, h, self._weights)
            if name == self._stop_after:
                raise StopForward(name)

        return hook

    def _patch_forward(self, mlp: nn.Module, forward) -> None:
        """mlp.forward = forward(mlp, x) on this instance, undone on exit."""
        patch = models.patched_forward(mlp, forward)
        patch.__enter__()
        self._undo.append(lambda: patch.__exit__(None, None, None))

    def _enter(self, *, pre_hook: bool) -> None:
        decoder = models.decoder_of(self.model)
        if getattr(decoder, _ACTIVE, False):
            raise RuntimeError("a ChannelScorer is already active on this model: exit it before entering another "
                               "(nested scorers would split the sums between them)")
        setattr(decoder, _ACTIVE, True)
        self._undo.append(lambda: delattr(decoder, _ACTIVE))
        if pre_hook:
            self._undo.append(decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True).remove)
        for name, mlp in self.mlps.items():
            if self.path == "hooks":
                self._undo.append(mlp.down_proj.register_forward_pre_hook(self._down_pre_hook(name)).remove)
            else:
                self._patch_forward(mlp, functools.partial(self._fused_mlp, name))

    def __enter__(self) -> "ChannelScorer":
        self._enter(pre_hook=True)
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()
        self._weights = self._mask = None
        self._scratch.clear()

    @contextmanager
    def driven(self, stop_after: str | None = None) -> Iterator["ChannelScorer"]:
        """The scorer entered for a driver that runs the layers itself: no decoder pre-hook (call `set_batch`
        before each forward), and with `stop_after` (an MLP name) `StopForward` is raised right after that MLP
        has scored; catch it around the forward. The model is restored on exit, as with `with scorer:`."""
        if stop_after is not None and stop_after not in self.mlps:
            raise ValueError(f"stop_after must name an MLP ({next(iter(self.mlps), None)}, ...), got {stop_after!r}")
        self._enter(pre_hook=False)  # (refused before any change when a scorer is already active)
        self._stop_after = stop_after
        try:
            yield self
        finally:
            self._stop_after = None
            self.__exit__()


def _check_inputs(model: nn.Module, input_ids, attention_mask) -> None:
    """What the decoder would reject obscurely, or misread: said plainly before any work."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor [sequences, length], got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [sequences, length], got shape {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got dtype {_dtype_name(input_ids)}")
    vocab = model.get_input_embeddings().num_embeddings
    if input_ids.numel() and not 0 <= input_ids.min().item() <= input_ids.max().item() < vocab:
        raise ValueError(f"input_ids must be in [0, {vocab}) (the vocabulary size), got ids from "
                         f"{input_ids.min().item()} to {input_ids.max().item()}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        got = getattr(attention_mask, "shape", type(attention_mask).__name__)
        raise ValueError(f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(got) if isinstance(got, torch.Size) else got}")
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"the model's weights are not loaded ({meta} is on the meta device): load them first")


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def run_scorer(scorer: ChannelScorer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               batch_size: int = 1, progress: bool | None = None) -> ChannelScorer:
    """Feed the sequences through the decoder only (no LM head), batch by batch, under `scorer`.

    The decoder runs under inference_mode without hooks (the batch's token weights are set here) and stops
    once the last MLP has scored: the last down_proj, the final norm and everything after never run."""
    _check_inputs(scorer.model, input_ids, attention_mask)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    decoder = models.decoder_of(scorer.model)
    device = scorer.model.get_input_embeddings().weight.device
    total = -(-input_ids.shape[0] // batch_size)
    with scorer.driven(stop_after=next(reversed(scorer.mlps), None)), torch.inference_mode():
        for batch in progress_bar(range(total), desc="scoring", unit="batch", progress=progress):
            rows = slice(batch * batch_size, (batch + 1) * batch_size)
            ids = input_ids[rows].to(device)
            mask = None if attention_mask is None else attention_mask[rows].to(device)
            scorer.set_batch(ids, mask if mask is not None and mask.dim() == 2 else None)
            try:
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
    return scorer


def score_channels(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   keep_token_ids=None, token_weights=None, batch_size: int = 1, path: str | None = None,
                   progress: bool | None = None, backend: str | None = None) -> dict[str, torch.Tensor]:
    """{"model.layers.{i}.mlp": float64 [I]}: common act^2 over all sequences, running the decoder only.

    `path`: the scoring path ("auto" = "fused", or "hooks"); `backend` is its deprecated name. 9 parameters,
    above the house limit of 6: the public signature the README's Python API documents."""
    path = _scoring_path(path, backend)
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.numel() == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: there are no tokens to score")
    scorer = ChannelScorer(model, keep_token_ids=keep_token_ids, token_weights=token_weights, path=path)
    return run_scorer(scorer, input_ids, attention_mask, batch_size=batch_size, progress=progress).scores
