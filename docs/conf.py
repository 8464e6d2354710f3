"""Sphinx configuration of the optax_sign documentation.

HTML:     python -m sphinx -W --keep-going -b html docs /tmp/docs_html
Doctests: python -m sphinx -W --keep-going -b doctest docs /tmp/docs_doctest
"""

import pathlib
import re

import jax

# The doc examples that build meshes need several devices; on CPU JAX
# simulates them, but only if this is set before any computation. The doctest
# builder runs every example in this process.
jax.config.update("jax_num_cpu_devices", 8)

import optax  # noqa: E402  (after the device count)
import optax_sign  # noqa: E402
from sphinx.util import logging  # noqa: E402
from sphinx.util.typing import stringify_annotation  # noqa: E402

project = "optax_sign"
author = "optax_sign authors"
copyright = "the optax_sign authors; Apache-2.0"  # noqa: A001
release = optax_sign.__version__
version = release

extensions = [
    "myst_nb",  # MyST markdown pages and the notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
]

exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# MyST: $...$ and $$...$$ math, anchors on headings for links between pages.
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# The notebooks are stored without outputs (the tests execute them at a small
# size); the docs build runs them at full size, so their pages show outputs.
nb_execution_mode = "force"
nb_execution_in_temp = True
nb_execution_timeout = 600
nb_execution_raise_on_error = True

# Autodoc: the Google-style docstrings of the library.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

# Nitpicky builds (-n): the signatures name classes of jax, optax and chex,
# whose inventories are not fetched (no intersphinx: the build runs offline).
nitpick_ignore_regex = [("py:class", r"(jax|optax|chex|numpy)(\..+)?")]

# Doctests: only the testcode / testoutput directives of the pages, each page
# self-contained (the docstrings' >>> examples are run by pytest
# --doctest-modules with the root conftest.py).
doctest_test_doctest_blocks = ""

html_theme = "alabaster"
html_title = f"optax_sign {release}"
html_static_path: list = []
html_theme_options = {"description": "Sign-based training for JAX / Optax",
                      "fixed_sidebar": True}

_logger = logging.getLogger(__name__)
_HERE = pathlib.Path(__file__).parent


def _check_api_pages(app):
  """Warns (an error under -W) when a name of ``optax_sign.__all__`` is on no
  API page, or an API page names something that is not public."""
  text = "\n".join(p.read_text() for p in sorted((_HERE / "api").glob("*.md")))
  documented = set(re.findall(
      r"^\.\. auto(?:function|class|data):: optax_sign\.(\w+)", text, re.M))
  for name in sorted(set(optax_sign.__all__) - documented):
    _logger.warning("optax_sign.%s is in __all__ but on no docs/api page", name)
  for name in sorted(documented - set(optax_sign.__all__)):
    _logger.warning("docs/api documents optax_sign.%s, which is not in "
                    "__all__", name)


def _alias_expansions():
  """(expanded text, short name) for optax's type aliases, longest first:
  autodoc would otherwise print ``optax.ScalarOrSchedule`` as a long union."""
  pairs = {}
  # optax.Params, Updates and OptState are all chex.ArrayTree.
  for alias, short in ((optax.ScalarOrSchedule, "optax.ScalarOrSchedule"),
                       (optax.Params, "chex.ArrayTree")):
    for mode in ("smart", "fully-qualified-except-typing"):
      pairs[stringify_annotation(alias, mode)] = short
  return sorted(pairs.items(), key=lambda p: -len(p[0]))


_EXPANSIONS = _alias_expansions()


def _short_aliases(app, what, name, obj, options, signature, return_annotation):
  del app, what, name, obj, options
  for text, short in _EXPANSIONS:
    signature = signature.replace(text, short) if signature else signature
    if return_annotation:
      return_annotation = return_annotation.replace(text, short)
  return signature, return_annotation


def setup(app):
  app.connect("builder-inited", _check_api_pages)
  app.connect("autodoc-process-signature", _short_aliases)
