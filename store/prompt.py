"""The prompt template shared by pretraining, fine-tuning, evaluation, export and consumers.

It lives in the store because it travels in every bundle's manifest and the consumer runtime
(no torch) renders it too.

Byte-level tokens are expensive on a tiny model, so the default template is compact. The
base model is pretrained on exactly this layout; a different template works but costs the
adaptation the base already learned.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nResponse: "
DEFAULT_TEMPLATE_NO_INPUT = "Instruction: {instruction}\nResponse: "


@dataclass(frozen=True)
class PromptTemplate:
    """How an (instruction, input) pair becomes the text before the response."""

    with_input: str = DEFAULT_TEMPLATE
    without_input: str = DEFAULT_TEMPLATE_NO_INPUT

    def __post_init__(self) -> None:
        for name, text in (("with_input", self.with_input), ("without_input", self.without_input)):
            if "{instruction}" not in text:
                raise ValueError(f"prompt template {name!r} must contain '{{instruction}}'")
        if "{input}" not in self.with_input:
            raise ValueError("prompt template 'with_input' must contain '{input}'")

    def render(self, instruction: str, input: str = "") -> str:
        if input:
            return self.with_input.replace("{instruction}", instruction).replace("{input}", input)
        return self.without_input.replace("{instruction}", instruction)


DEFAULT_PROMPT = PromptTemplate()


def render_prompt(instruction: str, input: str = "") -> str:
    """The default template applied to one example."""
    return DEFAULT_PROMPT.render(instruction, input)
