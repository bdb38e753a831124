"""Sphinx configuration: the Pallets "flask" theme, Markdown pages through MyST, and the API
reference from the docstrings. Built by .ci/run with warnings as errors."""

from pallets_sphinx_themes import ProjectLink, get_version

project = "Flask-Offload"
copyright = "The Flask-Offload maintainers"
author = "The Flask-Offload maintainers"
release, version = get_version("Flask-Offload")

extensions = ["myst_parser", "sphinx.ext.autodoc", "pallets_sphinx_themes"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
default_role = "code"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_context = {
    "project_links": [
        ProjectLink("Changelog", "changelog.html"),
        ProjectLink("Benchmarks", "benchmarks.html"),
    ]
}
html_sidebars = {
    "index": ["project.html", "localtoc.html", "searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
html_title = f"Flask-Offload Documentation ({version})"
html_show_sourcelink = False
