// The FeRA Schedule node's curve editor: one curve per expert over the sampling schedule (0 = first
// step, 1 = last). The node's `keyframes` input is a STRING to the server; its widgetType names this
// editor, whose value is the schedule's JSON text, so workflows store it and prompts send it.
// Mouse: drag a keyframe; press on a curve to add a keyframe on it, elsewhere to add one to the active
// expert (pick it in the legend); right-click a keyframe to delete it. Positions snap to 0.05 unless
// snap is off or Shift is held. Every edit is one step of ComfyUI's own undo (Ctrl+Z).
import { app } from "../../scripts/app.js";
import { beginPanel, eventXY, framePanel, screenKey } from "./fera_canvas.js";
import { cycle } from "./fera_chart_data.js";
import {
  MAX_EXPERTS, SNAP, addKeyframe, deleteKeyframe, emptySchedule, fromXY, hitTest, legendBoxes, moveKeyframe,
  parseSchedule, plotArea, readSchedule, resize, serialize, snap, structureThenTexture, toXY, valueAt, weightTop,
} from "./fera_schedule_data.js";

const NODE = "FeRASchedule";
const EDITOR = "FERA_SCHEDULE_EDITOR";
const PRESETS = {
  router: ["router's own (empty)", (ed) => emptySchedule(ed.schedule.curves.length)],
  structure: ["structure then texture", (ed) => structureThenTexture(ed.schedule.curves.length)],
  trace: ["start from what the router did", (ed) => ed.traced],
};

function element(tag, props = {}, style = {}) {
  const el = Object.assign(document.createElement(tag), props);
  Object.assign(el.style, style);
  return el;
}

/** Make the editor's state and DOM for `node`; the widget reads and writes `editor.text()`.
 * expertColors: fera_core.plot's expert colours, sent with the input's definition. */
function createEditor(node, text, expertColors) {
  const canvas = element("canvas", { title: "Drag a keyframe; press on a curve or in the chart to add one; "
    + "right-click to delete. Shift: no snapping." }, { width: "100%", flex: "1 1 auto", minHeight: "0", display: "block" });
  const bar = element("div", {}, { display: "flex", gap: "6px", alignItems: "center", flexWrap: "wrap",
                                    font: "11px sans-serif", color: "var(--fg-color)", padding: "0 0 3px 0" });
  const field = (label, input) => { const l = element("label", {}, { display: "flex", gap: "3px", alignItems: "center" });
    l.append(label, input); bar.append(l); return input; };
  const number = (min, max, step) => element("input", { type: "number", min, max, step },
    { width: "58px", font: "11px sans-serif" });
  const preset = element("select", {}, { font: "11px sans-serif" });
  preset.append(element("option", { value: "", textContent: "preset…" }));
  for (const [key, [label]] of Object.entries(PRESETS)) preset.append(element("option", { value: key, textContent: label }));
  bar.append(preset);
  const ed = {
    node, canvas, schedule: emptySchedule(3), raw: null, error: null, active: 0, selected: null, traced: null,
    drag: null, drawn: "", expertColors,
    inputs: { preset, experts: field("experts", number(1, MAX_EXPERTS, 1)),
              snap: field("snap", element("input", { type: "checkbox", checked: true })),
              percent: field("percent", number(0, 1, 0.01)), weight: field("weight", number(0, 100, 0.01)) },
  };
  ed.element = element("div", {}, { display: "flex", flexDirection: "column", width: "100%", height: "100%" });
  ed.element.append(bar, canvas);
  ed.text = () => ed.raw ?? serialize(ed.schedule);
  ed.load = (value) => {
    const { schedule, error } = parseSchedule(String(value));
    Object.assign(ed, schedule ? { schedule, raw: null, error: null } : { raw: String(value), error });
    ed.selected = null;
    ed.active = Math.min(ed.active, ed.schedule.curves.length - 1);
    sync(ed);
  };
  ed.load(text);
  listen(ed);
  return ed;
}

/** Replace the schedule (an edit): redraw and show the selected keyframe's numbers. */
function update(ed, schedule) {
  Object.assign(ed, { schedule, raw: null, error: null });
  sync(ed);
}

/** Record the edit in ComfyUI's undo history now (edits outside a mouse press are not seen otherwise). */
function commit() {
  app.canvas?.emitBeforeChange?.();
  app.canvas?.emitAfterChange?.();
}

function sync(ed) {
  const { inputs, selected } = ed;
  const key = selected && ed.schedule.curves[selected.expert]?.[selected.index];
  if (!key) ed.selected = null;
  inputs.experts.value = ed.schedule.curves.length;
  inputs.percent.disabled = inputs.weight.disabled = !key;
  inputs.percent.value = key ? key[0] : "";
  inputs.weight.value = key ? key[1] : "";
  inputs.preset.querySelector("option[value=trace]").disabled = !ed.traced;
  draw(ed);
  ed.node.setDirtyCanvas?.(true, false);
}

function listen(ed) {
  const { canvas, inputs } = ed;
  const geometry = () => ({ rect: plotArea(canvas.clientWidth, canvas.clientHeight), top: ed.drag?.top ?? weightTop(ed.schedule) });
  const position = (e, rect, top) => {
    const { x, y } = eventXY(canvas, e);
    const at = fromXY(x, y, rect, top);
    return inputs.snap.checked !== e.shiftKey
      ? { percent: snap(at.percent, SNAP.percent), weight: snap(at.weight, SNAP.weight) } : at;
  };
  const move = (e) => {
    const { rect, top } = geometry();
    const at = position(e, rect, top);
    update(ed, moveKeyframe(ed.schedule, ed.drag.expert, ed.drag.index, at.percent, at.weight));
  };
  const release = () => {
    window.removeEventListener("mousemove", move);
    ed.drag = null;
    sync(ed);
  };
  canvas.addEventListener("mousedown", (e) => {
    if (e.button !== 0 || ed.error) return;
    e.stopPropagation();
    const { rect, top } = geometry();
    const { x, y } = eventXY(canvas, e);
    const hit = hitTest(ed.schedule, x, y, rect, top);
    if (hit?.kind === "legend") { ed.active = hit.expert; sync(ed); return; }
    let target = hit;
    if (hit?.kind !== "key") {
      if (!hit && (x < rect.x || x > rect.x + rect.w || y < rect.y || y > rect.y + rect.h)) return;
      const expert = hit ? hit.expert : ed.active, at = position(e, rect, top);
      const weight = hit ? valueAt(ed.schedule.curves[expert], at.percent) : at.weight; // on the curve: keep its shape
      const added = addKeyframe(ed.schedule, expert, at.percent, weight);
      update(ed, added.schedule);
      target = { expert, index: added.index };
    }
    ed.active = target.expert;
    ed.selected = { expert: target.expert, index: target.index };
    ed.drag = { ...ed.selected, top };
    sync(ed);
    // ComfyUI records the state at this mouseup, the press and the drag as one undo step
    window.addEventListener("mousemove", move);
    window.addEventListener("mouseup", release, { once: true });
  });
  canvas.addEventListener("contextmenu", (e) => {
    e.preventDefault();
    e.stopPropagation();
    const { rect, top } = geometry();
    const { x, y } = eventXY(canvas, e);
    const hit = hitTest(ed.schedule, x, y, rect, top);
    if (hit?.kind !== "key" || ed.error) return;
    ed.selected = null;
    update(ed, deleteKeyframe(ed.schedule, hit.expert, hit.index));
    commit();
  });
  inputs.preset.addEventListener("change", () => {
    const make = PRESETS[inputs.preset.value]?.[1];
    inputs.preset.value = "";
    const schedule = make?.(ed);
    if (!schedule) return;
    ed.selected = null;
    update(ed, schedule);
    commit();
  });
  inputs.experts.addEventListener("change", () => {
    update(ed, resize(ed.schedule, Number(inputs.experts.value)));
    ed.active = Math.min(ed.active, ed.schedule.curves.length - 1);
    sync(ed);
    commit();
  });
  inputs.snap.addEventListener("change", () => sync(ed));
  for (const name of ["percent", "weight"]) {
    inputs[name].addEventListener("change", () => {
      const { selected } = ed;
      if (!selected || !Number.isFinite(Number(inputs[name].value))) return sync(ed);
      const [p, w] = ed.schedule.curves[selected.expert][selected.index];
      const value = Number(inputs[name].value);
      update(ed, moveKeyframe(ed.schedule, selected.expert, selected.index, name === "percent" ? value : p,
                              name === "weight" ? value : w));
      commit();
    });
  }
}

function draw(ed) {
  const begun = beginPanel(ed.canvas);
  if (!begun) return;
  const { ctx, width, height, colors } = begun;
  const rect = plotArea(width, height), top = ed.drag?.top ?? weightTop(ed.schedule);
  // frame, grid and axes
  framePanel(ctx, rect, colors, [0, top / 2, top].map((w) => [String(+w.toFixed(2)), toXY(0, w, rect, top).y]));
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const p of [0, 0.25, 0.5, 0.75, 1]) {
    const { x } = toXY(p, 0, rect, top);
    ctx.beginPath();
    ctx.moveTo(x, rect.y);
    ctx.lineTo(x, rect.y + rect.h);
    ctx.stroke();
    ctx.fillText(String(p), x, rect.y + rect.h + 3);
  }
  if (ed.error) {
    ctx.fillText(`keyframes not readable: ${ed.error}`, width / 2, rect.y + rect.h / 2, rect.w);
    return;
  }
  // legend: every expert, the active one underlined; experts without keyframes follow the router
  ed.schedule.curves.forEach((curve, m) => {
    const box = legendBoxes(ed.schedule.curves.length, rect)[m];
    ctx.fillStyle = cycle(ed.expertColors, m, colors.fg);
    ctx.textAlign = "left";
    ctx.fillText(curve.length ? `expert ${m}` : `${m}: router`, box.x, box.y + 2, box.w);
    if (m === ed.active) ctx.fillRect(box.x, box.y + box.h - 1, box.w - 4, 2);
  });
  if (ed.schedule.curves.every((c) => !c.length)) {
    ctx.fillStyle = colors.fg;
    ctx.textAlign = "center";
    ctx.fillText("the router's own routing: press in the chart to draw", rect.x + rect.w / 2, rect.y + rect.h / 2);
  }
  // curves, held flat before the first and after the last keyframe, and their keyframes
  ed.schedule.curves.forEach((curve, m) => {
    if (!curve.length) return;
    const color = cycle(ed.expertColors, m, colors.fg);
    const pts = [[0, curve[0][1]], ...curve, [1, curve[curve.length - 1][1]]].map(([p, w]) => toXY(p, w, rect, top));
    ctx.strokeStyle = color;
    ctx.lineWidth = m === ed.active ? 2.5 : 1.5;
    ctx.beginPath();
    pts.forEach(({ x, y }, i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.stroke();
    curve.forEach(([p, w], i) => {
      const { x, y } = toXY(p, w, rect, top);
      const selected = ed.selected?.expert === m && ed.selected.index === i;
      ctx.beginPath();
      ctx.arc(x, y, selected ? 5 : 3.5, 0, 2 * Math.PI);
      ctx.fillStyle = selected ? colors.bg : color;
      ctx.fill();
      ctx.lineWidth = 1.5;
      ctx.stroke();
    });
  });
}

app.registerExtension({
  name: "fera.schedule",
  getCustomWidgets() {
    return {
      [EDITOR](node, inputName, inputData) {
        const options = inputData?.[1] ?? {};
        const ed = createEditor(node, options.default ?? serialize(emptySchedule(3)), options.expert_colors);
        node.feraSchedule = ed;
        const widget = node.addDOMWidget(inputName, EDITOR, ed.element, {
          getValue: () => ed.text(),
          setValue: (value) => ed.load(value),
          getMinHeight: () => 200,
        });
        new ResizeObserver(() => draw(ed)).observe(ed.canvas);
        return { widget, minWidth: 380, minHeight: 280 };
      },
    };
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      executed?.apply(this, arguments);
      const traced = message?.fera_schedule_trace?.[0];
      const ed = this.feraSchedule;
      if (traced && ed) { ed.traced = readSchedule(traced).schedule ?? null; sync(ed); }
    };
    const foreground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function () {
      const ed = this.feraSchedule;
      const key = ed && screenKey(ed.canvas);
      if (ed && key !== ed.drawn) { ed.drawn = key; draw(ed); }
      return foreground?.apply(this, arguments);
    };
  },
});
