"""Hugging Face wrapper of BitMar (template appended to the flattened BitMar sources in modeling_bitmar.py).

`BitMarForCausalLM` is what `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` returns: the
BitMar network under `self.model` (state-dict keys `model.*`), optionally a frozen DINOv2 under
`self.vision_backbone` (keys `vision_backbone.*`) that turns `pixel_values` into the 768-d CLS feature BitMar was
trained on. `forward` returns next-token logits for the text positions only, so scoring code written for plain
causal LMs (BLiMP minimal pairs: summed log-probabilities after BOS) works unchanged.
`BitMarModel` is what `AutoModel` returns: the same modules and weights without the LM head (`last_hidden_state`),
for harnesses that put their own head on the hidden states (the BabyLM pipeline's fine-tuning).

One-shot learning: the model carries a persistent `EpisodicStore` (Larimar memory, exact write / read / forget),
filled from `episodic_store.safetensors` when the export has one and empty otherwise. `memory_write` stores one
episode per caption (key from the picture, value = the episode latent of caption + picture), `memory_read` reads it
back with a picture's key, and `forward` / `generate` with `use_memory=True` decode from that readout (readout prefix
plus the slot copy path), as the model was trained to and as bitmar's episodic-recall evaluation decodes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import Dinov2Config, Dinov2Model, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import cached_file

from bitmar.bitnet import BitLinear, PackedBitLinear
from bitmar.fileio import atomic_file
from bitmar.memory import EpisodicStore
from bitmar.model.bitmar import BitMar
from bitmar.model.decoder import decoder_layout
from bitmar.model.layers import Attention

from .configuration_bitmar import BitMarConfig

NO_BACKBONE_MESSAGE = (
    "this export has no vision backbone; pass vision_features or re-export with --vision_backbone (e.g. "
    "facebook/dinov2-base or a local DINOv2 directory); vision_features are the precomputed DINOv2 CLS features, "
    "shape (batch, {dim})"
)

# The persistent episodic store, next to model.safetensors (tensors of EpisodicStore.state_dict()).
EPISODIC_STORE_NAME = "episodic_store.safetensors"
# from_pretrained arguments that say where and how to fetch a file of the model (passed on for the store file).
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
EMPTY_STORE_MESSAGE = (
    "the episodic store holds no episodes: write one first with model.memory_write(input_ids, attention_mask, "
    "vision_features=... or pixel_values=...), load a store with model.memory_load(path), or use an export made "
    "from a checkpoint whose persistent store holds episodes (python -m bitmar.export without --no_store)"
)

# Keyword arguments that harnesses and GenerationMixin pass to every causal LM; BitMar has no use for them
# (positions come from the attention mask, there is no external cache, no token types).
_IGNORED_KWARGS = frozenset(
    {
        "token_type_ids",
        "position_ids",
        "cache_position",
        "output_attentions",
        "logits_to_keep",
        "num_logits_to_keep",
    }
)


def _packed_twin(layer: BitLinear) -> PackedBitLinear:
    """An empty PackedBitLinear shaped like `layer`, to be filled by `from_pretrained`.

    Its float state (RMSNorm gain, scale, bias) is float32 on purpose: transformers keeps a tensor in the dtype of
    the module's own tensor when that differs from the requested dtype, so the packed layers compute in float32
    (like training) even when the rest of the model is loaded in bfloat16.
    """
    packed = PackedBitLinear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        input_norm=layer.norm is not None,
        activation_bits=layer.activation_bits,
        device=layer.weight.device,
    )
    return packed.to(torch.float32)


def replace_with_packed(module: nn.Module) -> nn.Module:
    """Swap every quantized BitLinear of `module` for an empty PackedBitLinear twin (in place)."""
    twins: dict[int, PackedBitLinear] = {}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear) and child.quantize:
                if id(child) not in twins:
                    twins[id(child)] = _packed_twin(child)
                setattr(parent, name, twins[id(child)])
    return module


def causal_lm_loss(logits: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy: logits[:, t] predicts labels[:, t + 1]; -100 and padded targets are ignored."""
    targets = labels[:, 1:].clone()  # (B, T-1)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def check_forward_inputs(owner: str, kwargs: dict[str, Any], input_ids: Any, inputs_embeds: Any) -> None:
    """The arguments both model classes refuse: unknown keywords, and inputs_embeds instead of input_ids."""
    unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
    if unknown:
        raise TypeError(f"{owner}.forward got unexpected arguments {unknown}")
    if inputs_embeds is not None or input_ids is None:
        raise ValueError(f"{owner} needs input_ids (inputs_embeds are not supported)")


def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """The (B, T) padding mask of `attention_mask`: a (B, T) mask itself, or the causal (B, T, T) / (B, 1, T, T)
    mask built from one (the BabyLM pipeline's fine-tuning with --causal passes mask[:, None, :].repeat(T).tril()).
    BitMar's decoder is causal whatever the mask says, so only the padding is information; any other 3-d mask (one
    that would let a position see a later token, or hide an earlier real one) is refused instead of ignored."""
    if attention_mask is None or attention_mask.dim() == 2:
        return attention_mask
    mask = attention_mask[:, 0] if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 else attention_mask
    if mask.dim() == 3 and mask.shape[1] == mask.shape[2]:
        keys = mask.diagonal(dim1=1, dim2=2)  # (B, T): a real position attends to itself
        causal = (keys[:, None, :] != 0).expand_as(mask).tril()  # (B, T, T) what that padding mask means causally
        if torch.equal(mask != 0, causal):
            return keys
    raise ValueError(
        f"attention_mask of shape {tuple(attention_mask.shape)} is not a (batch, seq) padding mask nor the causal "
        "(batch, seq, seq) mask of one; BitMar's decoder is causal: pass the (batch, seq) padding mask"
    )


@contextmanager
def capture_hidden_states(decoder: nn.Module, enabled: bool) -> Iterator[list[Tensor]]:
    """Collect the decoder's hidden states during one forward (HF `output_hidden_states`), through hooks so the
    flattened BitMar code stays as trained: the input of the first block, each block's output, and the decoder's
    final-normed output of the text positions (see `text_hidden_states`)."""
    states: list[Tensor] = []
    if not enabled:
        yield states
        return
    blocks = list(decoder.blocks)
    handles = [blocks[0].register_forward_pre_hook(lambda _m, args: states.append(args[0]))]
    handles += [block.register_forward_hook(lambda _m, _args, out: states.append(out[0])) for block in blocks]
    handles.append(decoder.register_forward_hook(lambda _m, _args, out: states.append(out[0])))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def text_hidden_states(states: list[Tensor]) -> tuple[Tensor, ...]:
    """(layers + 1) tensors (B, T, C) of the text positions (the decoder prefix cut off): the embeddings, the outputs
    of blocks 1..L-1 and the final-normed output of block L (= last_hidden_state), as Llama-style models return."""
    final = states[-1]  # (B, T, C) text positions only
    length = final.shape[1]
    return (*(s[:, s.shape[1] - length :] for s in states[:-2]), final)


class BitMarPreTrainedModel(PreTrainedModel):
    config_class = BitMarConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TransformerBlock", "Dinov2Layer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # BitMar initialises its own parameters when built; loading fills them. Only the non-persistent per-head
        # gates are never in a checkpoint (transformers leaves them uninitialised after a meta-device build).
        if isinstance(module, Attention):
            module.head_gates.fill_(1.0)

    def _build_network(self, config: BitMarConfig) -> None:
        """BitMar under `self.model` and the optional frozen DINOv2 under `self.vision_backbone`: the same modules
        (and state-dict keys) in every head class, so AutoModel and AutoModelForCausalLM load the same weights."""
        self.model = BitMar(config.model_config())
        if config.packed:
            replace_with_packed(self.model)
        self.vision_backbone: Dinov2Model | None = None
        if config.vision_backbone_config is not None:
            self.vision_backbone = Dinov2Model(Dinov2Config.from_dict(config.vision_backbone_config))
            self.vision_backbone.requires_grad_(False)  # frozen: BitMar was trained on fixed DINOv2 features
        if self.model.memory is not None:
            # The stored episodes are addressed against the float32 prior (keys M0^+): a bfloat16 prior would read
            # them back inexactly. Kept float32 on load, as the packed layers are (see _packed_twin); a few kB.
            self.model.memory.to(torch.float32)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    # ------------------------------------------------------------------ vision

    def image_features(self, pixel_values: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, D)
        """DINOv2 CLS vector after the final layer norm (`pooler_output`): the feature BitMar was trained on."""
        if self.vision_backbone is None:
            raise ValueError(NO_BACKBONE_MESSAGE.format(dim=self.config.vision_encoder_dim))
        dtype = self.vision_backbone.embeddings.patch_embeddings.projection.weight.dtype
        return self.vision_backbone(pixel_values=pixel_values.to(dtype)).pooler_output

    def _vision_input(self, pixel_values: Tensor | None, vision_features: Tensor | None) -> Tensor | None:
        if pixel_values is None:
            return vision_features
        if vision_features is not None:
            raise ValueError("pass either pixel_values or vision_features, not both")
        return self.image_features(pixel_values)


class BitMarModel(BitMarPreTrainedModel):
    """`AutoModel.from_pretrained(dir, trust_remote_code=True)`: the decoder's final hidden states (B, T, C) of the text
    positions as `last_hidden_state` (no LM head), e.g. for the BabyLM pipeline's (Super)GLUE classifier, which
    reads the first or last token's state. Same weights as BitMarForCausalLM; `lm_logits(last_hidden_state)` equals its
    logits without a memory readout and without vision (the copy paths of both add to the logits;
    `self.model.vision_copy_log_probs` gives the vision one)."""

    _auto_class = "AutoModel"

    def __init__(self, config: BitMarConfig) -> None:
        super().__init__(config)
        self._build_network(config)
        self.post_init()

    def forward(
        self,
        input_ids: Tensor | None = None,  # (B, T), BOS first
        attention_mask: Tensor | None = None,  # (B, T) padding mask (or its causal (B, T, T) form); any side
        pixel_values: Tensor | None = None,  # (B, 3, H, W), through the stored DINOv2
        vision_features: Tensor | None = None,  # (B, D) precomputed DINOv2 CLS features
        memory_readout: Tensor | None = None,  # (B, R * E) episodic-memory readout as decoder prefix
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple[Tensor, ...]:
        check_forward_inputs("BitMarModel", kwargs, input_ids, inputs_embeds)
        attention_mask = padding_mask(attention_mask)
        vision_features = self._vision_input(pixel_values, vision_features)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        network = self.model
        # BitMar.forward's decoder path (text embeddings, [readout, vision] prefix, layout) without the LM head.
        network._check_text(input_ids, attention_mask)
        embeds = network.embed_tokens(input_ids)  # (B, T, C)
        vision_tokens = None
        if vision_features is not None:
            vision_tokens, _, _ = network._vision()(vision_features, False)
        prefix = network.decoder_prefix(vision_tokens, memory_readout)  # (B, P, C) or None
        key_mask = positions = None
        if attention_mask is not None:
            key_mask, positions = decoder_layout(attention_mask, 0 if prefix is None else prefix.shape[1])
        with capture_hidden_states(network.decoder, bool(output_hidden_states)) as states:
            hidden, _ = network.decoder(embeds, prefix, key_mask, positions)  # (B, T, C)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=text_hidden_states(states) if output_hidden_states else None,
        )
        use_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if use_dict else output.to_tuple()


class BitMarForCausalLM(BitMarPreTrainedModel, GenerationMixin):
    # save_pretrained copies the remote code next to the weights (transformers 5.x sets this when AutoModel loads the
    # class; 4.x does not, and its saved folder could not be loaded again: no modeling_bitmar.py).
    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config: BitMarConfig) -> None:
        super().__init__(config)
        self._build_network(config)
        self._episodic_store: EpisodicStore | None = None  # built at first use (memory_write) or by from_pretrained
        self.post_init()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.lm_head  # None when tied: BitMar multiplies by the embedding matrix directly

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor | None = None,  # (B, T), BOS first (the tokenizer adds it)
        attention_mask: Tensor | None = None,  # (B, T), 1 = real token; any padding side
        pixel_values: Tensor | None = None,  # (B, 3, H, W), through the stored DINOv2
        vision_features: Tensor | None = None,  # (B, D) precomputed DINOv2 CLS features
        labels: Tensor | None = None,  # (B, T), -100 = ignore
        past_key_values: Any = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        memory_readout: Tensor | None = None,  # (B, R * E) episodic-memory readout (BitMar.read_memory, memory_read)
        inputs_embeds: Tensor | None = None,
        use_memory: bool = False,  # read the store with the picture's key and decode from the readout
        output_hidden_states: bool | None = None,  # (layers + 1) x (B, T, C) of the text positions
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple[Tensor, ...]:
        """Logits (B, T, V) for the text positions: logits[:, t] predicts input_ids[:, t + 1].

        use_memory=True: the picture (pixel_values / vision_features) is the key of a read of the episodic store and
        the decoder is conditioned on the readout (prefix + copy path) instead of the picture, as in training's
        memory reconstruction. For both, pass `memory_readout=model.memory_read(...)` and the picture yourself.
        The model keeps no KV cache: `past_key_values` is ignored and every call recomputes the whole sequence
        (generation stays exact, just not incremental).
        """
        check_forward_inputs("BitMarForCausalLM", kwargs, input_ids, inputs_embeds)
        attention_mask = padding_mask(attention_mask)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        vision_features = self._vision_input(pixel_values, vision_features)
        if use_memory:
            if memory_readout is not None:
                raise ValueError("pass either use_memory=True or memory_readout, not both")
            if vision_features is None:
                raise ValueError(
                    "forward(use_memory=True) reads the store with the picture's key: pass pixel_values or "
                    "vision_features. A key from the text itself would let every position see the whole text; for a "
                    "prompt, read with model.memory_read(input_ids=prompt_ids) and pass memory_readout=..."
                )
            memory_readout = self.memory_read(vision_features=vision_features)
            vision_features = None  # the picture addressed the memory; the decoder reads the episode
        with capture_hidden_states(self.model.decoder, bool(output_hidden_states)) as states:
            out = self.model(
                input_ids,
                attention_mask,
                vision_features=vision_features,
                memory_readout=memory_readout,
                return_latents=False,
            )
        logits = out.logits  # (B, T, V)
        loss = causal_lm_loss(logits, labels, attention_mask) if labels is not None else None
        output = CausalLMOutputWithPast(  # no cache field: its name differs across versions
            loss=loss, logits=logits, hidden_states=text_hidden_states(states) if output_hidden_states else None
        )
        use_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if use_dict else output.to_tuple()  # to_tuple: (loss, logits, hidden_states), Nones left out

    # ------------------------------------------------------------------ generation

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a transformers cache: forward recomputes the whole sequence

    @torch.no_grad()
    def generate(
        self,
        inputs: Tensor | None = None,
        pixel_values: Tensor | None = None,
        vision_features: Tensor | None = None,
        use_memory: bool = False,
        **kwargs: Any,
    ) -> Any:
        """`GenerationMixin.generate`; a picture goes through DINOv2 once, not at every step.

        use_memory=True: read the episodic store once, with the picture's key (without a picture: the prompt's text
        key, as `BitMar.generate(memory_state=...)`), and generate from the readout (prefix + copy path); the picture
        only addresses the memory. Without a prompt, generation starts from BOS. Equals
        `BitMar.generate(memory_readout=model.memory_read(...), bos_token_id=...)`.
        """
        vision_features = self._vision_input(pixel_values, vision_features)
        if use_memory:
            if kwargs.get("memory_readout") is not None:
                raise ValueError("pass either use_memory=True or memory_readout, not both")
            prompt = inputs if inputs is not None else kwargs.get("input_ids")
            if vision_features is not None:
                kwargs["memory_readout"] = self.memory_read(vision_features=vision_features)
                vision_features = None
            elif prompt is not None:
                kwargs["memory_readout"] = self.memory_read(
                    input_ids=prompt, attention_mask=kwargs.get("attention_mask")
                )
            else:
                raise ValueError("generate(use_memory=True) needs a picture (pixel_values, vision_features) or prompt")
        if vision_features is not None:
            kwargs["vision_features"] = vision_features
        return super().generate(inputs, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        past_key_values: Any = None,
        attention_mask: Tensor | None = None,
        vision_features: Tensor | None = None,
        memory_readout: Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # The whole sequence every step, with the vision / memory prefix re-applied: exact, no cache to get wrong.
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "vision_features": vision_features,
            "memory_readout": memory_readout,
            "use_cache": False,
        }

    # ------------------------------------------------------------------ episodic memory (one-shot learning)

    def memory_store(self) -> EpisodicStore:
        """The persistent episodic store (built empty at first use), on the device of the memory prior."""
        memory = self.model._memory_part(self.model.memory)  # clear error for a model without memory
        if memory.prior.dtype != torch.float32:
            raise ValueError(
                f"the memory prior is {memory.prior.dtype} (was the model cast with .to(dtype)?); the episodic store "
                "addresses its episodes against the float32 prior: call model.model.memory.float() first"
            )
        device = memory.prior.device
        store = self._episodic_store
        if store is None:
            store = EpisodicStore(memory, device=device)
        elif store.device != device:  # the model moved (e.g. model.to("cuda")): the store follows it
            moved = EpisodicStore(memory, capacity=store.capacity, device=device)
            moved.load_state_dict(store.state_dict())
            store = moved
        self._episodic_store = store
        return store

    @property
    def memory_size(self) -> int:
        """Episodes the store holds now (0 for a model without memory); not `config.memory_size`, the slot count."""
        return len(self._episodic_store) if self._episodic_store is not None else 0

    @property
    def memory_capacity(self) -> int:
        """Episodes the store holds before it forgets the least-recently-used one (min(slots, width) by default)."""
        if self._episodic_store is not None:
            return self._episodic_store.capacity
        memory = self.model.memory
        return 0 if memory is None else EpisodicStore(memory, device=memory.prior.device).capacity  # its default

    @property
    def memory_episode_ids(self) -> list[int]:
        """Ids of the episodes held (what `memory_write` returned), oldest first."""
        return self._episodic_store.episode_ids if self._episodic_store is not None else []

    def _memory_key(
        self, vision_features: Tensor | None, input_ids: Tensor | None, attention_mask: Tensor | None
    ) -> Tensor:
        """(B, R * E) key: from the picture, else from the text (text-only models; prompts)."""
        if vision_features is not None:
            return self.model.memory_key(vision_features)
        if input_ids is None:
            raise ValueError("a memory key needs a picture (pixel_values / vision_features) or input_ids")
        return self.model.text_memory_key(input_ids, attention_mask)

    @torch.no_grad()
    def memory_write(
        self,
        input_ids: Tensor,  # (B, T) the captions, tokenized by the export's tokenizer (BOS first)
        attention_mask: Tensor | None = None,  # (B, T), 1 = real token; any padding side
        pixel_values: Tensor | None = None,  # (B, 3, H, W), through the stored DINOv2
        vision_features: Tensor | None = None,  # (B, D) precomputed DINOv2 CLS features
    ) -> list[int]:
        """Write one episode per row into the store; returns their ids (for memory_forget).

        Key: the picture alone (`BitMar.memory_key`), so the picture recalls the episode. Value: the episode latent
        of caption + picture (`BitMar.episode_latent`: pooled latent and the caption's tokens), so a new word heard
        once can be decoded again (copy path). Text-only models (use_vision=false) key the episode by its text.
        A full store forgets its least-recently-used episode first (exactly). Rows holding NaN/inf change nothing.
        """
        store = self.memory_store()
        vision_features = self._vision_input(pixel_values, vision_features)
        if vision_features is None and self.model.fusion is not None:
            raise ValueError(
                "memory_write needs the picture of each caption (pixel_values or vision_features): the key comes from "
                "the picture and the episode value fuses caption and picture"
            )
        if vision_features is not None and vision_features.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"memory_write got {input_ids.shape[0]} captions but {vision_features.shape[0]} pictures; one per row"
            )
        if input_ids.shape[0] > store.capacity:
            raise ValueError(
                f"memory_write got {input_ids.shape[0]} episodes but the store holds at most {store.capacity}; the "
                "later ones would evict the earlier ones of the same call: write at most that many"
            )
        keys = self._memory_key(vision_features, input_ids, attention_mask).float()  # (B, R * E)
        values = self.model.episode_latent(input_ids, attention_mask, vision_features).float()  # (B, R * E)
        bad = (~torch.isfinite(keys).all(dim=1)) | (~torch.isfinite(values).all(dim=1))
        if bool(bad.any()):  # refuse the whole batch before writing any of it
            raise ValueError(
                f"rows {bad.nonzero().flatten().tolist()} give a non-finite key or value (NaN or inf); nothing was "
                "written"
            )
        return [store.write(key, value) for key, value in zip(keys, values, strict=True)]

    @torch.no_grad()
    def memory_read(
        self,
        pixel_values: Tensor | None = None,
        vision_features: Tensor | None = None,
        input_ids: Tensor | None = None,  # a text key (a prompt) when no picture is given
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Readout (B, R * E) of the store for each picture's key: `BitMar.read_memory(store.state, key=...)`,
        noise-free whatever the mode. Pass it as `memory_readout` to forward / generate (or use use_memory=True)."""
        store = self.memory_store()
        if len(store) == 0:
            raise ValueError(EMPTY_STORE_MESSAGE)
        key = self._memory_key(self._vision_input(pixel_values, vision_features), input_ids, attention_mask)
        memory = self.model.memory
        was_training = memory.training
        memory.eval()  # addressing noise is a training regulariser, not part of a read
        try:
            readout, _ = self.model.read_memory(store.state, key=key)
        finally:
            memory.train(was_training)
        store.read(key.float())  # marks the episodes read as recently used: the store's LRU eviction order
        return readout

    def memory_forget(self, episode_ids: int | Iterable[int]) -> None:
        """Forget episodes exactly (the rest read back as if these were never written); unknown ids change nothing."""
        store = self.memory_store()
        ids = [episode_ids] if isinstance(episode_ids, int) else [int(i) for i in episode_ids]
        unknown = sorted(set(ids) - set(store.episode_ids))
        if unknown:
            raise KeyError(f"no episodes {unknown} in the store (it holds {store.episode_ids}); nothing was forgotten")
        for episode_id in dict.fromkeys(ids):
            store.forget(episode_id)

    def memory_clear(self) -> None:
        """Forget every episode (the store keeps its capacity)."""
        store = self.memory_store()
        self._episodic_store = EpisodicStore(store.memory, capacity=store.capacity, device=store.device)

    def memory_save(self, save_directory: str | os.PathLike) -> Path | None:
        """Write the store as `episodic_store.safetensors` into `save_directory` (atomically) and return its path.

        An empty store writes nothing and removes an older store file there, so loading the directory gives back the
        store as it is now. `save_pretrained` calls this."""
        self.model._memory_part(self.model.memory)
        directory = Path(save_directory)
        target = directory / EPISODIC_STORE_NAME
        if self.memory_size == 0:
            target.unlink(missing_ok=True)
            return None
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.memory_store().state_dict().items()}
        with atomic_file(target) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "episodes": str(self.memory_size)})
        return target

    def memory_load(self, path: str | os.PathLike) -> None:
        """Replace the store by the one saved at `path`: a directory holding episodic_store.safetensors, or the file."""
        memory = self.model._memory_part(self.model.memory)
        file = Path(path)
        if file.is_dir():
            file = file / EPISODIC_STORE_NAME
        if not file.is_file():
            raise FileNotFoundError(f"no episodic store at {file}; memory_save / save_pretrained writes one")
        try:
            tensors = load_file(str(file))
            store = EpisodicStore(memory, device=memory.prior.device)
            store.load_state_dict(tensors)
        except Exception as err:  # safetensors, shape and key errors alike: say which file and what to do
            raise ValueError(
                f"{file} is not an episodic store of this model ({type(err).__name__}: {err}); it was written for "
                "another model (re-export the checkpoint) or is damaged (delete it to start with an empty store)"
            ) from err
        self._episodic_store = store

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, then the episodic store from episodic_store.safetensors when present
        (a local directory, or a hub repository with the same revision / cache / token arguments)."""
        hub = {name: kwargs[name] for name in _HUB_KWARGS if name in kwargs}
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        if model.model.memory is not None:
            file = cached_file(
                pretrained_model_name_or_path,
                EPISODIC_STORE_NAME,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **hub,
            )
            if file is not None:
                model.memory_load(file)
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, plus the episodic store (`memory_save`). `push_to_hub(repo)` saves
        through here, store included; `save_pretrained(..., push_to_hub=True)` uploads before the store is added."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process and self.model.memory is not None:
            self.memory_save(save_directory)
