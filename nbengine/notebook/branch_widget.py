"""The clickable branch view (anywidget): click a generated token, its alternatives appear; choose one to fork.

The Python side renders the HTML (the same token view as everywhere, plus the branch tree) and
the alternatives of every position; the browser side only routes clicks: a token opens the list
of its alternatives under the view, an alternative sends ``fork``, a branch of the tree sends
``select``. The fork runs in the kernel (the comm handler), then the view is redrawn.
"""

from __future__ import annotations

import math
from typing import Any

import anywidget
import traitlets

_ESM = r"""
function render({ model, el }) {
  const view = document.createElement("div");
  const menu = document.createElement("div");
  menu.className = "nbe-alts";
  menu.style.cssText = "margin-top: 6px; font-size: 12px; min-height: 1.5em;";
  el.appendChild(view);
  el.appendChild(menu);
  const draw = () => { view.innerHTML = model.get("html"); };
  const status = () => { const b = model.get("busy"); if (b) menu.textContent = b; };
  const open = (pos) => {
    const alts = (model.get("alternatives") || [])[pos] || [];
    menu.innerHTML = "";
    const head = document.createElement("span");
    head.textContent = alts.length ? `position ${pos}, continue with: ` : `position ${pos}: no alternatives`;
    menu.appendChild(head);
    for (const [id, text, p] of alts) {
      const b = document.createElement("button");
      b.className = "nbe-alt";
      b.dataset.pos = pos;
      b.dataset.id = id;
      b.textContent = `${JSON.stringify(text)} ${p.toFixed(3)}`;
      b.style.cssText = "margin: 2px 4px 2px 0; font-family: monospace; cursor: pointer;";
      menu.appendChild(b);
    }
  };
  draw();
  model.on("change:html", () => { draw(); menu.innerHTML = ""; });
  model.on("change:busy", status);
  el.addEventListener("click", (e) => {
    const alt = e.target.closest(".nbe-alt");
    if (alt) { model.send({ event: "fork", position: +alt.dataset.pos, token: +alt.dataset.id }); return; }
    const br = e.target.closest("[data-branch]");
    if (br) { model.send({ event: "select", branch: +br.dataset.branch }); return; }
    const tok = e.target.closest(".nbe-output .nbe-tok");
    if (tok) open(+tok.dataset.i);
  });
}
export default { render };
"""


class BranchWidget(anywidget.AnyWidget):
    _esm = _ESM
    html = traitlets.Unicode("").tag(sync=True)
    alternatives = traitlets.List([]).tag(sync=True)  # per position: [[token_id, text, p], ...]
    busy = traitlets.Unicode("").tag(sync=True)

    def __init__(self, branches: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.branches = branches
        self.on_msg(self._on_msg)
        self.sync()

    def sync(self) -> None:
        rows = self.branches.branch.rows
        with self.hold_sync():
            self.html = self.branches.view_html()
            self.alternatives = [[[t.token_id, t.text, round(math.exp(v), 4)] for v, t in r.top
                                  if t.token_id != r.token.token_id] for r in rows]

    def _on_msg(self, _widget: Any, content: dict, _buffers: Any) -> None:
        event = content.get("event") if isinstance(content, dict) else None
        try:
            if event == "fork":
                self.busy = "generating ..."
                self.branches.fork(int(content["position"]), int(content["token"]))
            elif event == "select":
                self.branches.select(int(content["branch"]))
            else:
                return
            self.busy = ""
        except Exception as e:  # noqa: BLE001 - shown in the widget; the kernel and engine go on
            self.busy = f"could not {event}: {e}"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if isinstance(data, dict):  # where widgets don't render (GitHub, nbviewer without state): the static view
            data.update(self.branches._repr_mimebundle_())
        return bundle
