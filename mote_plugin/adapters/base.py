"""Base class for MoE family adapters.

An adapter describes one MoE family of transformers 5.x models: where the sparse MoE blocks live, how the router
picks experts and weights them, how an expert computes the input of its down-projection (the "keys" the editor
solves for), and how the packed down-projection parameter is laid out so that edits can be written back in place.

Notation used in shape comments:
    N        tokens (flattened batch * sequence)
    K        experts per token (top-k)
    E        routed experts in the block
    d_model  hidden size of the residual stream
    d_hidden intermediate size of one routed expert

The default implementation is the Qwen3-MoE layout, shared by most families in transformers 5:

    experts.gate_up_proj  [E, 2 * d_hidden, d_model]   rows [:d_hidden] are the gate, rows [d_hidden:] the up projection
    experts.down_proj     [E, d_model, d_hidden]
    router: softmax over all experts in float32 -> top-k -> optional renormalisation -> cast to the logits' dtype

Subclasses override only what differs (routing, activation, layout).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from ..mote.algebra.routed_keys import RoutedKeys, expert_groups


class MoEAdapter(ABC):
    """Describes one MoE family. Instances are stateless: every method takes the model or the MoE block."""

    # Human-readable family name, used in error messages.
    family: str = ""
    # `config.model_type` values (of the model config or of its `text_config`) that belong to this family.
    model_types: tuple[str, ...] = ()
    # Attribute names on the sparse MoE block.
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_expert_attr: str | None = None
    # Linear [d_model -> 1] whose sigmoid scales the shared expert's output (Qwen2-MoE, Qwen3.5-MoE), if any.
    shared_expert_gate_attr: str | None = None
    # Attribute name of the feed-forward module on a decoder layer.
    mlp_attr: str = "mlp"
    # True when the packed expert weights are stored as [E, in, out] instead of [E, out, in] (GPT-OSS).
    is_transposed: bool = False
    # Largest float32 delta built at once by `add_lowrank` (bytes; at least one expert). Small enough that the delta,
    # its cast and the added slice stay in cache: at the Qwen3-30B-A3B shape one expert per chunk (6 MiB) writes a
    # layer in half the time of 64 MiB chunks (benchmarks/results/solver_speed.md).
    WRITE_CHUNK_BYTES: int = 8 * 2**20

    # ------------------------------------------------------------------------------------------------------------
    # Recognition and structure
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether `model` belongs to this family, judged from its config's `model_type` (or its text sub-config's)."""
        config = getattr(model, "config", None)
        if config is None:
            return False
        candidates = [config, getattr(config, "text_config", None)]
        return any(getattr(c, "model_type", None) in cls.model_types for c in candidates if c is not None)

    @classmethod
    @abstractmethod
    def block_class(cls) -> type[nn.Module]:
        """The transformers class of this family's sparse MoE block (imported lazily)."""

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of the (text) model, e.g. `model.model.layers`."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"could not find the decoder layers of {type(model).__name__}")
        return layers

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def moe_block(self, model: nn.Module, layer: int) -> nn.Module | None:
        """The sparse MoE block of decoder layer `layer`, or None when that layer has a dense MLP."""
        mlp = getattr(self.decoder_layers(model)[layer], self.mlp_attr, None)
        return mlp if isinstance(mlp, self.block_class()) else None

    def unsupported(self, mlp: nn.Module) -> str | None:
        """Why `mlp` (a decoder layer's feed-forward module that is not `block_class`) is this family's MoE block in a
        form MoTE cannot edit, naming the fix (e.g. quantized experts); None when it is not such a block."""
        return None

    def moe_layers(self, model: nn.Module) -> list[int]:
        """Indices of the decoder layers that hold a sparse MoE block."""
        return [i for i in range(self.num_layers(model)) if self.moe_block(model, i) is not None]

    def experts(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts_attr)

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def shared_expert(self, block: nn.Module) -> nn.Module | None:
        """The always-on shared expert(s) of the block, if any. The editor never edits it."""
        return getattr(block, self.shared_expert_attr) if self.shared_expert_attr is not None else None

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's contribution to the block output for input x [N, d_model] (None if there is none).

        Block output = routed experts output + shared_output. Computed with the model's own modules and dtype,
        returned as float32 [N, d_model].
        """
        shared = self.shared_expert(block)
        if shared is None:
            return None
        x = x.reshape(-1, x.shape[-1]).to(next(shared.parameters()).dtype)  # [N, d_model], the model's dtype
        with torch.no_grad():
            output = shared(x)  # [N, d_model]
            if self.shared_expert_gate_attr is not None:
                output = F.sigmoid(getattr(block, self.shared_expert_gate_attr)(x)) * output  # [N, 1] * [N, d_model]
        return output.float()

    def num_experts(self, block: nn.Module) -> int:
        return self.down_param(block).shape[0]

    def d_hidden(self, block: nn.Module) -> int:
        down_proj = self.down_param(block)  # [E, d_model, d_hidden], or [E, d_hidden, d_model] when transposed
        return down_proj.shape[1] if self.is_transposed else down_proj.shape[2]

    # ------------------------------------------------------------------------------------------------------------
    # Routing
    # ------------------------------------------------------------------------------------------------------------

    def renormalize(self, router: nn.Module) -> bool:
        """Whether the top-k probabilities are renormalised to sum to one."""
        return router.norm_topk_prob

    def route(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the block's router computes for the MoE block input x [N, d_model].

        Returns top_k_index [N, K] (long) and top_k_weights [N, K] (float32): the experts and weights the experts'
        forward receives. Default: softmax in float32 over all experts, top-k, optional renormalisation, cast to the
        logits' dtype (Qwen3-MoE, Qwen2-MoE, OLMoE, Qwen3.5-MoE).
        """
        router = self.router(block)
        x = x.reshape(-1, x.shape[-1])
        router_logits = F.linear(x.to(router.weight.dtype), router.weight)  # [N, E]
        router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # [N, E]
        top_k_weights, top_k_index = torch.topk(router_probs, router.top_k, dim=-1)  # [N, K]
        if self.renormalize(router):
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return top_k_index, top_k_weights.to(router_logits.dtype).float()

    # ------------------------------------------------------------------------------------------------------------
    # Expert math
    # ------------------------------------------------------------------------------------------------------------

    def expert_keys(self, block: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Down-projection input of one expert for tokens x [M, d_model] (float32): act(gate x) * up x [M, d_hidden]."""
        experts = self.experts(block)
        gate_up_proj = experts.gate_up_proj[expert].float()  # [2 * d_hidden, d_model]
        gate, up = F.linear(x, gate_up_proj).chunk(2, dim=-1)  # [M, d_hidden] each
        return experts.act_fn(gate) * up

    def keys(self, block: nn.Module, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """Input of each selected expert's down-projection, in float32.

        x [N, d_model], expert_idx [N, K] (long) -> keys [N, K, d_hidden], keys[n, j] = k of expert expert_idx[n, j].
        """
        x = x.reshape(-1, x.shape[-1]).float()  # [N, d_model]
        keys = x.new_zeros(*expert_idx.shape, self.d_hidden(block))  # [N, K, d_hidden]
        with torch.no_grad():
            for expert, rows, slots in expert_groups(expert_idx):
                keys[rows, slots] = self.expert_keys(block, x[rows], expert)
        return keys

    def route_keys(self, block: nn.Module, x: torch.Tensor) -> RoutedKeys:
        """Route x [N, d_model] and compute the selected experts' keys, once: RoutedKeys with expert_idx [N, K],
        gates [N, K] and keys [N, K, d_hidden], float32."""
        expert_idx, gates = self.route(block, x)  # [N, K], [N, K]
        keys = self.keys(block, x, expert_idx)  # [N, K, d_hidden]
        return RoutedKeys(expert_idx.long(), gates.float(), keys, self.num_experts(block))

    def down_param(self, block: nn.Module) -> nn.Parameter:
        """The packed down-projection parameter itself, in its own layout and dtype."""
        return self.experts(block).down_proj

    def down_weight(self, block: nn.Module, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Down-projection weights in the canonical layout [E, d_model, d_hidden], in `dtype` (None: the parameter's).

        A view of the parameter when it has that dtype (do not modify it in place; transposed layouts give a
        non-contiguous view), a copy otherwise.
        """
        down_proj = self.down_param(block).detach()
        if self.is_transposed:
            down_proj = down_proj.transpose(1, 2)  # [E, d_hidden, d_model] -> [E, d_model, d_hidden]
        return down_proj if dtype is None else down_proj.to(dtype)

    def down_bias(self, block: nn.Module) -> torch.Tensor | None:
        """Down-projection bias [E, d_model] float32, or None."""
        return None

    def experts_output(self, block: nn.Module, routed: RoutedKeys) -> torch.Tensor:
        """The routed experts' output sum_j g_j (W_j k_j + b_j) of every token of `routed` (`route_keys`), from
        down_weight / down_bias -> [N, d_model] float32 (shared experts excluded)."""
        down_weight = self.down_weight(block)  # [E, d_model, d_hidden]
        down_bias = self.down_bias(block)  # [E, d_model] or None
        gates = routed.gates.float()  # [N, K]
        output = routed.keys.new_zeros(routed.keys.shape[0], down_weight.shape[1])  # [N, d_model]
        with torch.no_grad():
            for expert, rows, slots in routed.groups():
                values = F.linear(routed.keys[rows, slots], down_weight[expert])  # [M, d_model]
                if down_bias is not None:
                    values = values + down_bias[expert]
                output.index_add_(0, rows, values * gates[rows, slots, None])
        return output

    # ------------------------------------------------------------------------------------------------------------
    # Writing edits back
    # ------------------------------------------------------------------------------------------------------------

    def add_lowrank(
        self, block: nn.Module, left: torch.Tensor, right: torch.Tensor, experts: torch.Tensor | None = None
    ) -> None:
        """Add left @ right[e] to every expert e (or to experts[e] when `experts` is given), chunk by chunk.

        left [d_model, r] (shared by all experts) or [M, d_model, r] (one per expert), right [E, r, d_hidden] (or
        [M, r, d_hidden] with experts [M]). Each chunk's delta is computed in float32 into one reused buffer of at most
        WRITE_CHUNK_BYTES, cast into the parameter's dtype (a second reused buffer) and added in place: bounded extra
        memory, and no fresh allocation per chunk (first-touch page faults cost more than the matmul at real shapes).
        """
        param = self.down_param(block)
        left, right = left.to(param.device, torch.float32), right.to(param.device, torch.float32)
        per_expert = left.shape[-2] if left.dim() == 3 else left.shape[0]  # [.., d_model, r] -> d_model
        n, _, d_hidden = right.shape
        step = max(1, min(n, self.WRITE_CHUNK_BYTES // (4 * d_hidden * per_expert)))
        shape = (step, d_hidden, per_expert) if self.is_transposed else (step, per_expert, d_hidden)
        buffer = torch.empty(shape, device=param.device)  # float32 chunk delta, the parameter's layout
        cast = None if param.dtype == torch.float32 else torch.empty(shape, device=param.device, dtype=param.dtype)
        for start in range(0, n, step):
            chunk = slice(start, min(start + step, n))
            m = chunk.stop - chunk.start
            l, r = (left if left.dim() == 2 else left[chunk]), right[chunk]  # [(m,) d, r], [m, r, h]
            if self.is_transposed:
                torch.matmul(r.transpose(1, 2), l.transpose(-1, -2), out=buffer[:m])  # [m, h, d]
            else:
                torch.matmul(l, r, out=buffer[:m])  # [m, d, h]
            delta = buffer[:m] if cast is None else cast[:m].copy_(buffer[:m])
            self._add_to_down_param(block, delta, chunk if experts is None else experts[chunk])

    def _add_to_down_param(self, block: nn.Module, delta: torch.Tensor, experts: torch.Tensor | slice | None) -> None:
        """Cast delta (already in the parameter's layout) to the parameter's dtype once and add it in place, to all
        experts (None), a contiguous range (slice) or listed experts (long tensor).

        Listed experts must be distinct. They are added run by run: each run of consecutive expert ids is one slice
        add, bitwise the sums of `index_add_` (which on the CPU adds expert by expert, 2-3x slower in bf16 at real
        shapes).
        """
        param = self.down_param(block)
        delta = delta.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            if experts is None:
                param.add_(delta)
            elif isinstance(experts, slice):
                param[experts].add_(delta)
            else:
                ids = experts.tolist()
                if len(set(ids)) != len(ids):
                    raise ValueError(f"listed experts must be distinct, got {ids}")
                start = 0
                for i in range(1, len(ids) + 1):
                    if i == len(ids) or ids[i] != ids[i - 1] + 1:  # run ids[start:i] = first, first + 1, ...
                        param[ids[start] : ids[start] + i - start].add_(delta[start:i])
                        start = i
