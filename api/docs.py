"""The /docs page: the OpenAPI document rendered server-side as one self-contained HTML page."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, current_app, render_template_string
from flask.typing import ResponseReturnValue

from api.auth import public
from api.openapi import build_document

bp = Blueprint("docs", __name__)

# Inline styles only, no scripts and nothing fetched: the page works offline and under a
# Content-Security-Policy of default-src 'none'.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ doc.info.title }} API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
code,pre{font:13px ui-monospace,monospace}pre{background:#f5f5f5;padding:.6rem;overflow:auto}
section{border-top:1px solid #ddd;padding:.6rem 0}.m{font-weight:700;text-transform:uppercase}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}
details summary{cursor:pointer}
</style></head><body>
<h1>{{ doc.info.title }} API {{ doc.info.version }}</h1>
<p>{{ doc.info.description }}</p>
<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI {{ doc.openapi }}).</p>
{% for path, methods in doc.paths.items() %}{% for method, op in methods.items() %}
<section id="{{ op.operationId }}">
<h2><span class="m">{{ method }}</span> <code>{{ path }}</code></h2>
<p>{{ op.summary }}{% if op.security == [] %} — no token needed{% endif %}</p>
{% if op.parameters %}<table><tr><th>parameter</th><th>in</th><th>required</th><th>about</th></tr>
{% for p in op.parameters %}<tr><td><code>{{ p.name }}</code></td><td>{{ p.in }}</td>
<td>{{ "yes" if p.required else "no" }}</td><td>{{ p.description }}</td></tr>{% endfor %}
</table>{% endif %}
{% if op.requestBody %}<p>Body: {% for media, c in op.requestBody.content.items() %}
<code>{{ media }}</code> {{ schema_name(c.schema) }}{% if not loop.last %}, or {% endif %}
{% endfor %}</p>{% endif %}
<table><tr><th>status</th><th>meaning</th><th>body</th></tr>
{% for code, r in op.responses.items() %}<tr><td>{{ code }}</td><td>{{ r.description }}</td>
<td>{% for media, c in (r.content or {}).items() %}<code>{{ media }}</code>
{{ schema_name(c.schema) }} {% endfor %}</td></tr>{% endfor %}</table>
</section>{% endfor %}{% endfor %}
<h2>Schemas</h2>
{% for name, schema in doc.components.schemas.items() %}
<details id="schema-{{ name }}"><summary><code>{{ name }}</code></summary>
<pre>{{ pretty(schema) }}</pre></details>{% endfor %}
</body></html>
"""


def schema_name(schema: dict[str, Any]) -> str:
    """The model a schema refers to, or its type."""
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[1] if isinstance(ref, str) else str(schema.get("type", ""))


def _pretty(schema: Any) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False)


@bp.get("/docs")
@public
def page() -> ResponseReturnValue:
    """The API reference as HTML, built from the same document as /openapi.json."""
    doc = build_document(current_app)
    return render_template_string(PAGE, doc=doc, schema_name=schema_name, pretty=_pretty)
