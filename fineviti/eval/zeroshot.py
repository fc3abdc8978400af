"""Zero-shot classification: class embeddings from class names and prompt templates (CLIP's recipe).

Each class's prompts are encoded, L2-normalised, averaged over the templates and normalised again (as
openai/CLIP's ImageNet notebook and open_clip's `build_zero_shot_classifier` do); an image is assigned the class
whose embedding has the highest cosine similarity (`metrics.classification_accuracy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fineviti.eval.metrics import classification_accuracy

Template = str | Callable[[str], str]

# One plain prompt: the default for datasets whose captions are not photo-like (the synthetic scenes).
DEFAULT_TEMPLATES: tuple[Template, ...] = ("a photo of a {}.",)
# The seven-template subset of CLIP's 80 ImageNet prompts that open_clip ships as SIMPLE_IMAGENET_TEMPLATES.
SIMPLE_IMAGENET_TEMPLATES: tuple[Template, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def format_prompt(template: Template, classname: str) -> str:
    if callable(template):
        return template(classname)
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' placeholder for the class name")
    return template.replace("{}", classname)


def prompts(classnames: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """Every class's prompts, class-major: class 0 with each template, then class 1, ..."""
    if len(classnames) == 0:
        raise ValueError("classnames is empty; expected at least one class name")
    if len(templates) == 0:
        raise ValueError("templates is empty; expected at least one prompt template")
    return [format_prompt(t, c) for c in classnames for t in templates]


def class_embeddings(text_emb: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes * n_templates, dim) prompt embeddings, class-major -> (n_classes, dim) unit class embeddings."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be an integer >= 1, got {n_classes!r}")
    if text_emb.dim() != 2 or text_emb.shape[0] % n_classes:
        raise ValueError(
            f"text_emb has shape {tuple(text_emb.shape)}; expected (n_classes * n_templates, dim) with "
            f"n_classes = {n_classes}"
        )
    per_class = torch.nn.functional.normalize(text_emb.float(), dim=-1).view(n_classes, -1, text_emb.shape[1])
    return torch.nn.functional.normalize(per_class.mean(dim=1), dim=-1)


def build_classifier(encode_texts: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                     templates: Sequence[Template] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """Class embeddings (n_classes, dim) from `encode_texts(list of prompts) -> (n_prompts, dim)`."""
    return class_embeddings(encode_texts(prompts(classnames, templates)), len(classnames))


def zero_shot_accuracy(img_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                       ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-1 / top-5 accuracy of images against class embeddings (see `metrics.classification_accuracy`)."""
    return classification_accuracy(img_emb, class_emb, labels, ks=ks)
