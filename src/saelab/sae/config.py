"""What an SAE folder's ``cfg.json`` describes: the shapes, the architecture, the kind of dictionary and what it
was trained on."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Kind:
    """What a dictionary reads and writes, whatever its activation rule (the architecture)."""

    name: str
    summary: str
    separate_output: bool = False   # reconstructs another hook point than the one it reads (d_out may differ)
    skip: bool = False              # plus a learned linear map from input to output, x @ W_skip.T (zero at the start)
    multi_hook: bool = False        # reads (and writes) several hook points side by side (n_hooks blocks of d_in)
    cross_layer: bool = False       # latent block l reads input hook l only and writes output hooks l, l+1, ... only


# The kinds a dictionary can be; every architecture (activation rule) works with each.
KINDS = {kind.name: kind for kind in (
    Kind("sae", "reconstructs the activation it reads"),
    Kind("transcoder", "reads one hook point (an MLP's input) and predicts another (that MLP's output); "
         "Dunefsky et al. 2024", separate_output=True),
    Kind("skip_transcoder", "a transcoder plus a learned linear skip connection from its input to its output "
         "(Paulo et al. 2025)", separate_output=True, skip=True),
    Kind("crosscoder", "one dictionary over several hook points (e.g. the residual stream after blocks 3, 6 and 9, "
         "joined by +): one latent vector from the sum of per-hook encodings, a decoder per hook, the L1 penalty "
         "on the sum of a latent's decoder norms (Lindsey et al. 2024)", multi_hook=True),
    Kind("clt", "cross-layer transcoder over several blocks (their MLP inputs joined by +): each block's latents "
         "read that block's MLP input and write to the MLP outputs of that block and every later one, the loss "
         "summed over those outputs (Ameisen et al. 2025)", separate_output=True, multi_hook=True, cross_layer=True),
)}


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: str
    k: int | None = None                    # topk: latents kept per token; batchtopk, matryoshka: on average
    apply_b_dec_to_input: bool = True
    metadata: dict = field(default_factory=dict)  # model, hook(s), context and dataset it was trained on
    kind: str = "sae"                       # a key of KINDS
    d_out: int | None = None                # the output's width (None: d_in, an SAE)
    options: dict = field(default_factory=dict)  # an architecture's own cfg.json fields (its module's folder_options)
    n_hooks: int = 1                        # a crosscoder or CLT: the hook points d_in holds side by side

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of dictionary {self.kind!r}: kind must be one of {', '.join(KINDS)}")
        if KINDS[self.kind].separate_output:
            self.apply_b_dec_to_input = False  # b_dec lives in the output space (SAELens requires this too)
            if self.d_out is None:
                self.d_out = self.d_in
        elif self.d_out not in (None, self.d_in):
            raise ValueError(f"an SAE reconstructs its input: d_out ({self.d_out}) must equal d_in ({self.d_in})")
        if KINDS[self.kind].cross_layer and (self.d_sae % self.n_hooks or self.output_size % self.n_hooks):
            raise ValueError(f"a cross-layer transcoder over {self.n_hooks} blocks needs d_sae ({self.d_sae}) and "
                             f"d_out ({self.output_size}) divisible by {self.n_hooks}: as many latents per block")
        if KINDS[self.kind].multi_hook:
            if self.n_hooks < 2 or self.d_in % self.n_hooks:
                raise ValueError(f"a {self.kind} reads n_hooks >= 2 hook points of equal width, side by side in d_in "
                                 f"(got n_hooks={self.n_hooks}, d_in={self.d_in})")
        elif self.n_hooks != 1:
            raise ValueError(f"a {self.kind} reads one hook point (n_hooks={self.n_hooks})")

    @property
    def shape(self) -> str:
        """``d_in -> d_sae`` (a transcoder: ``-> d_out`` too), for messages and reports."""
        if self.cross_layer:
            return f"{self.n_hooks} x {self.hook_width} -> {self.n_hooks} x {self.d_sae // self.n_hooks} -> " \
                   f"{self.n_hooks} x {self.output_hook_width}"
        if self.n_hooks > 1:
            return f"{self.n_hooks} x {self.hook_width} -> {self.d_sae}"
        return f"{self.d_in} -> {self.d_sae}" + (f" -> {self.output_size}" if self.separate_output else "")

    def describe(self) -> str:
        """``topk, 576 -> 4608``, ``jumprelu skip_transcoder, 576 -> 4608 -> 576``, ``topk crosscoder, 3 x 576 ->
        4608``."""
        return f"{self.architecture}{'' if self.kind == 'sae' else ' ' + self.kind}, {self.shape}"

    @property
    def hook_width(self) -> int:
        """The width of one hook point's activation (a crosscoder's d_in holds n_hooks of them)."""
        return self.d_in // self.n_hooks

    @property
    def output_hook_width(self) -> int:
        """The width of one output hook's activation (a CLT's d_out holds n_hooks of them)."""
        return self.output_size // self.n_hooks

    @property
    def read_hooks(self) -> list[str]:
        """The hook points it reads, by name, from its metadata (a crosscoder's or CLT's ``hook_names``)."""
        names = self.metadata.get("hook_names") if self.n_hooks > 1 else [self.metadata.get("hook_name")]
        return [name for name in names or [] if name]

    @property
    def written_hooks(self) -> list[str]:
        """The hook points it writes, by name: those it reads, or a transcoder's ``hook_name_out`` (a CLT's
        ``hook_names_out``)."""
        if not self.separate_output:
            return self.read_hooks
        names = self.metadata.get("hook_names_out") if self.n_hooks > 1 else [self.metadata.get("hook_name_out")]
        return [name for name in names or [] if name]

    @property
    def cross_layer(self) -> bool:
        return KINDS[self.kind].cross_layer

    @property
    def output_size(self) -> int:
        return self.d_in if self.d_out is None else self.d_out

    @property
    def skip(self) -> bool:
        return KINDS[self.kind].skip

    @property
    def separate_output(self) -> bool:
        return KINDS[self.kind].separate_output
