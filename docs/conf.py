"""Sphinx configuration of the lightning-mc documentation (``make docs``: offline, warnings are errors).

Sphinx, because it is what Lightning, torchmetrics, MONAI and Captum document themselves with: autodoc reads the
Google-style docstrings the package already has (napoleon), so the API reference is the code's own text; MyST lets
the guides be Markdown files that GitHub renders too and that pytest-markdown-docs runs; furo is a clean, offline
theme. Nothing here reaches the network: no intersphinx inventory is fetched, external types are simply not linked.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package is importable without being installed

from sphinx.util import logging as sphinx_logging  # noqa: E402

import lightning_mc  # noqa: E402

logger = sphinx_logging.getLogger(__name__)

project = "lightning-mc"
author = "lightning-mc contributors"
copyright = "lightning-mc contributors, Apache-2.0"
release = lightning_mc.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**/__pycache__", "conftest.py"]
templates_path: list[str] = []
html_static_path: list[str] = []

# MyST: GitHub-style Markdown; anchors for headings so pages can link to sections (``page.md#a-section``).
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc + napoleon: Google-style docstrings, members in source order, type hints in the signature.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" of dataclasses become fields, not a second description of each attribute
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options: dict[str, object] = {}  # every directive says :members: itself


def _type_aliases() -> dict[str, str]:
    """``Name -> module.Name`` for the package's type aliases (``FillSpec = Union[...]`` at module level)."""
    aliases = {}
    pattern = re.compile(r"^([A-Z][A-Za-z]+) = (?:Union|Literal|Callable|Any|Mapping|Sequence)\b", re.MULTILINE)
    for path in sorted((ROOT / "lightning_mc").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for name in pattern.findall(path.read_text(encoding="utf-8")):
            aliases[name] = f"{module}.{name}"
    return aliases


#: The annotations are strings (``from __future__ import annotations``), so signatures name the aliases, bare
#: (``FillSpec``) or dotted (``lightning_mc.core.occlusion.FillSpec``); both link to the alias's entry in
#: ``api/types.md`` (an alias without an entry there stays a warning, so the page is kept complete).
TYPE_ALIASES = _type_aliases()

# Nitpicky (-n in the Makefile): every cross-reference must resolve, except to the types of other libraries, which
# are not linked because the build is offline (no intersphinx).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|torchmetrics|lightning|pytorch_lightning|matplotlib|numpy|np|typing_extensions)(\..*)?"),
    (r"py:.*", r"(nn|pl|L)\..*"),  # torch.nn, lightning.pytorch as the package imports them
    (r"py:.*", r"(Tensor|Metric|Figure|Callback|Trainer|LightningModule|Module|Generator|dtype|device)"),
    (r"py:.*", r"(collections\.abc|typing|abc|pathlib|dataclasses)\..*"),
    (r"py:.*", r"(Path|Any|Mapping|Sequence|Iterable|Iterator|Callable|Literal|Union|Optional|Protocol|ClassVar)"),
]
# Fill's docstring names the private method a subclass implements (it has no docstring of its own, so no entry)
nitpick_ignore = [("py:meth", "_fill")]


def _undo_inline_attribute_type(app, what, name, obj, options, lines) -> None:
    """Napoleon reads ``#: Text: more text`` on an attribute as ``type: description``; put the sentence back.

    A real type has no spaces (``int``, ``dict[str, float]``); a ``:type:`` of several words is the first clause of a
    sentence whose colon napoleon took for the type separator.
    """
    if what not in ("attribute", "data"):
        return
    for index, line in enumerate(lines):
        if line.startswith(":type: ") and " " in line[len(":type: ") :].strip() and "[" not in line:
            clause = line[len(":type: ") :].strip()
            del lines[index]
            first = next((i for i, text in enumerate(lines) if text.strip()), None)
            if first is not None:
                lines[first] = f"{clause}: {lines[first]}"
            return


def _resolve_fallback(app, env, node, contnode):
    """Resolve the package's references that Sphinx's exact lookup misses.

    - A type alias, bare or dotted, links to its ``py:type`` entry in ``api/types.md``.
    - A bare name (``:func:`balance_coefficients```) written in a module whose public names are documented under
      ``lightning_mc`` (the re-export path) links to the one documented object of that name, as a fuzzy
      (``.name``) search finds it; several candidates stay a warning.
    """
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    target = node["reftarget"]
    name = target.rsplit(".", 1)[-1]
    if name in TYPE_ALIASES:
        return domain.resolve_xref(env, node["refdoc"], app.builder, "type", TYPE_ALIASES[name], node, contnode)
    if "." in target or node.get("refspecific"):
        return None
    fuzzy = node.deepcopy()
    fuzzy["refspecific"] = True
    fuzzy["py:module"] = None
    fuzzy["py:class"] = None
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], target, fuzzy, contnode)


#: How-to pages that other work adds; each is in ``how-to/index.md``'s toctree but left out until its file exists.
PENDING_HOW_TOS = ("monai", "hugging-face", "lightning-cli", "collapse")


def _drop_missing_how_tos(app, docname: str, source: list[str]) -> None:
    """Leave a pending how-to page out of the toctree while its file does not exist (noted, not a warning)."""
    if docname != "how-to/index":
        return
    for name in PENDING_HOW_TOS:
        if not (Path(app.srcdir) / "how-to" / f"{name}.md").exists():
            source[0] = re.sub(rf"^{re.escape(name)}\n", "", source[0], flags=re.MULTILINE)
            logger.info(f"how-to/{name}.md does not exist yet: left out of the how-to toctree")


def setup(app) -> None:
    """Sphinx extension hook of this configuration."""
    app.connect("source-read", _drop_missing_how_tos)
    app.connect("autodoc-process-docstring", _undo_inline_attribute_type, priority=600)  # after napoleon (500)
    app.connect("missing-reference", _resolve_fallback)


html_theme = "furo"
html_title = f"lightning-mc {release}"
html_show_sourcelink = False
