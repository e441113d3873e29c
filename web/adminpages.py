"""The admin page's HTML: plain server-made pages and forms, no script, nothing from elsewhere.

Every value shown is escaped here (`e`), whoever chose it: a sender, a remote
server's reply, an alias an admin typed.  Every form posts with the session's
token (`form`).  The style sheet is web/static/admin.css.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

NAV = (("/admin", "Overview"), ("/admin/users", "Users"), ("/admin/aliases", "Aliases"),
       ("/admin/queue", "Queue"), ("/admin/deliveries", "Deliveries"), ("/admin/status", "Status checks"))


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str, *, csrf: str = "", who: str = "", nav: bool = True, flash: Sequence[str] = (),
         error: str = "") -> bytes:
    menu = ""
    if nav:
        links = "".join(f'<a href="{href}">{e(text)}</a>' for href, text in NAV)
        menu = f'<nav>{links}<span class="who">{e(who)}</span>{form("/logout", csrf, button("Log out"))}</nav>'
    elif who:
        menu = f'<nav><span class="who">{e(who)}</span>{form("/logout", csrf, button("Log out"))}</nav>'
    notes = "".join(f'<p class="flash">{e(line)}</p>' for line in flash)
    if error:
        notes += f'<p class="error" id="error">{e(error)}</p>'
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)} - Mailroom</title>'
            f'<link rel="stylesheet" href="/admin.css"></head><body>{menu}<main><h1>{e(title)}</h1>{notes}'
            f"{body}</main></body></html>").encode()


def form(action: str, csrf: str, inner: str, *, cls: str = "") -> str:
    return (f'<form method="post" action="{e(action)}"{f" class={e(cls)!r}" if cls else ""}>'
            f'<input type="hidden" name="csrf" value="{e(csrf)}">{inner}</form>')


def hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{e(name)}" value="{e(value)}">'


def field(name: str, label: str, *, kind: str = "text", value: str = "", maxlength: int = 320,
          required: bool = True, size: int = 24) -> str:
    req = " required" if required else ""
    return (f'<label>{e(label)} <input type="{kind}" name="{e(name)}" value="{e(value)}" '
            f'maxlength="{maxlength}" size="{size}"{req}></label>')


def select(name: str, label: str, options: Iterable[str]) -> str:
    opts = "".join(f'<option value="{e(o)}">{e(o)}</option>' for o in options)
    return f'<label>{e(label)} <select name="{e(name)}">{opts}</select></label>'


def button(text: str, action: str = "") -> str:
    value = f' name="action" value="{e(action)}"' if action else ""
    return f'<button type="submit"{value}>{e(text)}</button>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, ident: str = "", row_ids: Sequence[str] = (),
          row_classes: Sequence[str] = ()) -> str:
    """Cells are HTML already (escape values with `e`)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        attrs = ""
        if i < len(row_ids):
            attrs += f' data-id="{e(row_ids[i])}"'
        if i < len(row_classes) and row_classes[i]:
            attrs += f' class="{e(row_classes[i])}"'
        body.append(f"<tr{attrs}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    empty = f'<tr><td colspan="{len(headers)}" class="empty">none</td></tr>' if not body else ""
    return f'<table{f" id={e(ident)!r}" if ident else ""}><thead><tr>{head}</tr></thead>' \
           f'<tbody>{"".join(body)}{empty}</tbody></table>'


def login(csrf: str, error: str = "") -> bytes:
    inner = (field("name", "Name or mail address", maxlength=320) + field("password", "Password", kind="password",
                                                                          maxlength=1024)
             + button("Log in"))
    return page("Log in", form("/login", csrf, inner, cls="login"), nav=False, error=error)


def error_page(status: int, phrase: str, text: str) -> bytes:
    return page(f"{status} {phrase}", f'<p class="error" id="error">{e(text)}</p><p><a href="/admin">Back</a></p>',
                nav=False)


def checks_table(report: dict[str, Any]) -> str:
    if report.get("unreachable"):
        return f'<p class="error" id="unreachable">{e(report["unreachable"])}</p>'
    rows, ids, classes = [], [], []
    for c in report["checks"]:
        rows.append([e(c["kind"]), e(c["name"]), f'<span class="level {e(c["level"])}">{e(c["state"])}</span>',
                     e(c["expected"]), e(c["found"]), e(" ".join(x for x in (c["note"], c["fix"]) if x))])
        ids.append(f'{c["kind"]}:{c["name"]}')
        classes.append(f'check {c["level"]}')
    return table(["check", "what", "state", "expected", "found", "how to fix"], rows, ident="checks",
                 row_ids=ids, row_classes=classes)
