"""Images in cells: ``--image PATH_OR_VAR`` resolved, placed in the prompt, and shown as thumbnails."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

THUMBNAIL_PX = 160  # longest side of a thumbnail above the answer


def resolve_images(values: list[str] | None, user_ns: dict[str, Any]) -> list[Any]:
    """Each ``--image`` value: a notebook variable (an image, bytes, a path, or a list of them) or a file path."""
    images: list[Any] = []
    for value in values or []:
        if value.isidentifier() and value in user_ns:
            found = user_ns[value]
            images.extend(found if isinstance(found, (list, tuple)) else [found])
        elif Path(value).expanduser().is_file():
            images.append(str(Path(value).expanduser()))
        else:
            raise ValueError(f"--image {value}: no notebook variable or file of that name; pass a path or the name "
                             "of a variable holding a PIL image, bytes or a path.")
    return images


def placeholder(llm: Any) -> str:
    """The image placeholder of the engine's model; raises for a text-only model."""
    processor = getattr(llm, "processor", None)
    if processor is None:
        raise ValueError("--image needs a vision-language model (e.g. Qwen2.5-VL); this engine's model reads text "
                         "only. Load one with %nbengine load MODEL.")
    return processor.placeholder


def image_parts(text: str, count: int) -> list[dict[str, Any]]:
    """A user message's OpenAI-style content: ``count`` image parts, then the text."""
    return [{"type": "image"}] * count + [{"type": "text", "text": text}]


def thumbnails(images: list[Any]) -> Any:
    """An IPython display object showing the images side by side, small."""
    from IPython.display import HTML

    from ..multimodal import load_image

    tags = []
    for i, item in enumerate(images):
        image = load_image(item, f"--image {i + 1}")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode()
        tags.append(f'<img src="data:image/png;base64,{data}" alt="image {i + 1}" '
                    f'style="display:inline-block;margin:2px;max-height:{THUMBNAIL_PX}px">')
    return HTML('<div class="nbengine-images">' + "".join(tags) + "</div>")
