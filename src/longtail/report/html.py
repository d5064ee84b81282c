"""One self-contained HTML page: inline CSS, PNG figures as base64 data URIs, no network.

The page carries a small inline script that, once the window has loaded, counts the
`<img>` elements that decoded (`complete` and `naturalWidth > 0`) and writes the counts
to `<body data-figures-loaded="k" data-figures-total="n">`, so a headless browser (or a
person with the developer tools) can check that every figure rendered.
"""

from __future__ import annotations

import base64
from html import escape

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
table.kv th { background: #f6f6f6; white-space: nowrap; }
table.metrics th { background: #f6f6f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; max-width: 60em; }
p.note { font-size: .85em; color: #555; }
nav a { margin-right: 1em; }
"""

MARKER_SCRIPT = """
window.addEventListener('load', function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  document.body.setAttribute('data-figures-loaded', String(loaded));
  document.body.setAttribute('data-figures-total', String(images.length));
});
"""


def figure_html(png: bytes, *, caption: str, alt: str, name: str) -> str:
    """An <img> with the PNG inline (data URI) and its caption; `name` goes to data-figure."""
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure data-figure="{escape(name)}"><img alt="{escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def page(*, title: str, body: list[str]) -> str:
    """The whole document: `body` is a list of HTML fragments, already escaped."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body)
            + f"\n<script>{MARKER_SCRIPT}</script>\n</body></html>\n")
