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


# The kinds a dictionary can be; every architecture (activation rule) works with each.
KINDS = {kind.name: kind for kind in (
    Kind("sae", "reconstructs the activation it reads"),
    Kind("transcoder", "reads one hook point (an MLP's input) and predicts another (that MLP's output); "
         "Dunefsky et al. 2024", separate_output=True),
    Kind("skip_transcoder", "a transcoder plus a learned linear skip connection from its input to its output "
         "(Paulo et al. 2025)", separate_output=True, skip=True),
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

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of dictionary {self.kind!r}: kind must be one of {', '.join(KINDS)}")
        if KINDS[self.kind].separate_output:
            self.apply_b_dec_to_input = False  # b_dec lives in the output space (SAELens requires this too)
            if self.d_out is None:
                self.d_out = self.d_in
        elif self.d_out not in (None, self.d_in):
            raise ValueError(f"an SAE reconstructs its input: d_out ({self.d_out}) must equal d_in ({self.d_in})")

    @property
    def shape(self) -> str:
        """``d_in -> d_sae`` (a transcoder: ``-> d_out`` too), for messages and reports."""
        return f"{self.d_in} -> {self.d_sae}" + (f" -> {self.output_size}" if self.separate_output else "")

    def describe(self) -> str:
        """``topk, 576 -> 4608`` or ``jumprelu skip_transcoder, 576 -> 4608 -> 576``."""
        return f"{self.architecture}{' ' + self.kind if self.separate_output else ''}, {self.shape}"

    @property
    def output_size(self) -> int:
        return self.d_in if self.d_out is None else self.d_out

    @property
    def skip(self) -> bool:
        return KINDS[self.kind].skip

    @property
    def separate_output(self) -> bool:
        return KINDS[self.kind].separate_output
