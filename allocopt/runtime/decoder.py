"""Run a decoder from layer j on cached states, or one layer at a time, without per-family code.

Two candidates that keep the same experts in every MoE layer before layer j compute identical hidden states at
the input of layer j, so the second one can start there. Decoder layers 0..j-1 have their ``forward`` temporarily
replaced by one that returns the cached output of layer j-1, so embeddings, the causal mask, rotary tables and
per-layer attention types (indexed by position in the list) are all computed exactly as in a normal forward, and
only the real layers j.. do work. A layer's output is cached whole, whatever its structure: a tensor for most
families, a tuple where a layer hands more than its hidden state to the next one (GLM-MoE-DSA and HY-V4 pass the
indexer's top-k along). A layer that already has an instance ``forward`` (accelerate's hooks) keeps it: skipping
replaces it for the call and restores it after, so a skipped offloaded layer is not even read from disk.
``DecoderRunner.check`` compares this against a full forward once; callers fall back when it differs, or when the
partial forward fails because a skipped layer hands state to a later one outside its output (Kolibri-1.1's layers
read the keys and values an earlier layer stored in a dict the model's forward passes to every layer).

``run_layer`` goes one step further for models larger than memory: it runs layer j alone (the layers before it
skipped, the ones after it never reached, the embedding replaced by its cached output), so a caller can push
every row through one layer while only that layer's weights are resident (:func:`resident`).

Example::

    runner = DecoderRunner(model)
    logits, states = runner.run(ids, mask, capture=[2, 4])        # full forward, keep inputs of layers 2, 4
    logits2, _ = runner.run(ids, mask, start=2, hidden=states[2])  # same logits, layers 0-1 skipped
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from allocopt.models.adapter import decoder_layers

log = logging.getLogger(__name__)

State = Any          # a decoder layer's output: a tensor, or a tuple whose first item is the hidden state


def _detached(output: State) -> State:
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple):
        return tuple(_detached(o) for o in output)
    return output


def state_bytes(state: State) -> int:
    """Bytes held by a cached layer output (tensors inside tuples included)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (tuple, list)):
        return sum(state_bytes(s) for s in state)
    return 0


class _Stop(Exception):
    """Raised by a forward hook to end a forward once the layer of interest has run."""


@contextlib.contextmanager
def _replaced(module: nn.Module, forward: Any) -> Iterator[None]:
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


class DecoderRunner:
    def __init__(self, model: nn.Module):
        self.model = model
        _, self.layers = decoder_layers(model)

    @contextlib.contextmanager
    def _skip(self, start: int, state: State) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for layer in list(self.layers)[:start]:
                stack.enter_context(_replaced(layer, lambda *a, **k: state))
            yield

    @contextlib.contextmanager
    def _capture(self, layers: Sequence[int], out: dict[int, State]) -> Iterator[None]:
        """``out[j]`` = the output of decoder layer j-1, i.e. everything layer j is started from."""
        def hook(index: int):
            def fn(module: nn.Module, args: tuple, output: State) -> None:
                out[index] = _detached(output)
            return fn
        handles = [self.layers[j - 1].register_forward_hook(hook(j)) for j in layers if j > 0]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _head_rows(self, positions: torch.Tensor | None, tokens: int, gathered: list[bool]) -> Iterator[None]:
        """The LM head runs on the flattened [B*T, H] hidden states at ``positions`` only, so it returns [n, V]
        logits: no [B, T, V] tensor is built and then gathered (a copy as large as the logits). A head input that
        is not ``tokens`` = B*T positions (a head on the last token only, or in chunks) is left alone; ``gathered``
        records whether the hook narrowed it."""
        head = None if positions is None else self.model.get_output_embeddings()
        if head is None:
            yield
            return

        def gather(module: nn.Module, args: tuple) -> tuple | None:
            h = args[0]
            if gathered or h.shape[:-1].numel() != tokens:
                return None
            gathered.append(True)
            return (h.reshape(-1, h.shape[-1])[positions.to(h.device)], *args[1:])
        handle = head.register_forward_pre_hook(gather)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0,
            hidden: State | None = None, capture: Sequence[int] = (), positions: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, dict[int, State]]:
        """Logits [B, T, V] (with ``positions``, indices into the flattened [B*T] positions: [n, V] at those
        positions) and the states layers in ``capture`` (all > start) start from."""
        if start and hidden is None:
            raise ValueError("start > 0 needs the output of layer start-1 (the state layer `start` starts from)")
        states: dict[int, State] = {}
        gathered: list[bool] = []
        with self._skip(start, hidden), self._capture([j for j in capture if j > start], states), \
                self._head_rows(positions, input_ids.numel(), gathered):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits
        if positions is None:
            return logits, states
        rows = logits.shape[:-1].numel()
        if gathered and rows == positions.numel():
            return logits.reshape(-1, logits.shape[-1]), states
        if not gathered and rows == input_ids.numel():          # the head is not a module call: gather afterwards
            return logits.reshape(-1, logits.shape[-1])[positions.to(logits.device)], states
        raise RuntimeError(f"logits of shape {tuple(logits.shape)} match neither the {input_ids.numel()} positions of the "
                           f"batch nor the {positions.numel()} asked for; score this model without positions")

    @torch.no_grad()
    def run_layer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: int, state: State | None,
                  embeddings: torch.Tensor | None = None) -> tuple[State, torch.Tensor]:
        """Layer ``index`` alone, started from ``state`` (the output of layer index-1; None for layer 0): returns
        (its output, the embedding output). With ``embeddings`` given the embedding does not run either."""
        if index and state is None:
            raise ValueError("index > 0 needs the output of layer index-1")
        captured: dict[str, Any] = {}

        def keep_output(module: nn.Module, args: tuple, output: State) -> None:
            captured["out"] = _detached(output)
            raise _Stop

        def keep_embeddings(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured["emb"] = output.detach()

        embedding = self.model.get_input_embeddings()
        handles = [self.layers[index].register_forward_hook(keep_output),
                   embedding.register_forward_hook(keep_embeddings)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._skip(index, state))
            if embeddings is not None:
                stack.enter_context(_replaced(embedding, lambda *a, **k: embeddings))
            self._forward_until_stop(input_ids, attention_mask, handles)
        if "out" not in captured:
            raise RuntimeError(f"decoder layer {index} did not run; this model's forward does not call its layers in order")
        return captured["out"], captured.get("emb", embeddings)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The embedding's output alone (the forward stops before decoder layer 0 runs), for :meth:`run_layer`'s
        ``embeddings``: a layer-streamed pass then never holds the embedding and a layer's weights at once."""
        captured: dict[str, torch.Tensor] = {}

        def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured["emb"] = output.detach()

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _Stop

        self._forward_until_stop(input_ids, attention_mask, [
            self.model.get_input_embeddings().register_forward_hook(keep),
            self.layers[0].register_forward_pre_hook(stop, with_kwargs=True, prepend=True)])
        if "emb" not in captured:
            raise RuntimeError("the embedding did not run before decoder layer 0; this model's forward is unsupported")
        return captured["emb"]

    def _forward_until_stop(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, handles: list) -> None:
        """A forward that a hook may end early by raising ``_Stop``; the hooks in ``handles`` are removed either way."""
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()

    def check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]) -> bool:
        """True when starting from every layer in ``layers`` reproduces the full forward's logits."""
        full, states = self.run(input_ids, attention_mask, capture=layers)
        for j in layers:
            if j == 0:
                continue
            try:
                part, _ = self.run(input_ids, attention_mask, start=j, hidden=states[j])
            except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
                # a skipped layer hands on more than its output (Kolibri-1.1's shared K/V): no partial forwards
                log.info(f"a forward cannot start at decoder layer {j} ({type(exc).__name__}: {exc}); every "
                         "evaluation runs all layers")
                return False
            if not _same_logits(part, full):
                return False
        return True

    def check_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
        """True when ``run(..., positions=...)`` gives the full forward's logits at those positions (every other
        position of the batch); False, not an error, where the model's forward cannot take the narrowed head."""
        full, _ = self.run(input_ids, attention_mask)
        positions = torch.arange(0, input_ids.numel(), 2, device=input_ids.device)
        try:
            part, _ = self.run(input_ids, attention_mask, positions=positions)
        except (RuntimeError, IndexError, ValueError):
            return False
        return full.shape[:-1].numel() == input_ids.numel() and \
            _same_logits(part, full.reshape(-1, full.shape[-1])[positions.to(full.device)])


def _same_logits(a: torch.Tensor, b: torch.Tensor) -> bool:
    atol = 1e-5 if b.dtype == torch.float32 else 1e-2
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=0, atol=atol, equal_nan=True)


@contextlib.contextmanager
def resident(module: nn.Module, exclude: Sequence[nn.Module] = ()) -> Iterator[nn.Module]:
    """Inside the context every offloaded weight of ``module`` (accelerate's CPU/disk offload) is loaded once and
    stays loaded across calls, instead of being read again for each forward; on exit it is offloaded again.
    Submodules of ``exclude`` stay offloaded (e.g. the decoder layers, to pin only the embedding and head).
    A module that is not offloaded is left as it is."""
    skipped = {id(m) for e in exclude for m in e.modules()}
    pinned = []
    try:
        for m in module.modules():
            if id(m) in skipped:
                continue
            hook = getattr(m, "_hf_hook", None)
            if hook is not None and getattr(hook, "offload", False):
                hook.pre_forward(m)
                hook.offload = False
                pinned.append((m, hook))
        yield module
    finally:
        for m, hook in reversed(pinned):
            hook.offload = True
            hook.post_forward(m, None)
