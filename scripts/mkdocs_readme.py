"""mkdocs hook: the site's front page is README.md, with its `docs/` links made site-relative.

README.md is the one front page (GitHub shows it; `docs/index.md` is only its placeholder), so the
two never differ. Named in mkdocs.yml under `hooks:`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[1] / "README.md"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    text = README.read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)
