// Live routing chart inside the FeRA Routing Trace node.
// The server sends "fera.trace" events (start, one per sampling step, end) only while a prompt
// with a trace node whose `live` input is on runs; the node's own output then shows the finished
// run. The canvas is a DOM widget that is never serialised into the workflow.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { beginPanel, eventXY, framePanel, screenKey } from "./fera_canvas.js";
import {
  applyEvent, colorOf, describe, fromOutput, isFor, layout, nearest, points, scheduleLines, stepX, valueY,
} from "./fera_chart_data.js";

const NODE = "FeRARoutingTrace";
const DASH = { cond: [], uncond: [5, 3], all: [1, 2] };

function panel(ctx, rect, colors, label) {
  framePanel(ctx, rect, colors, [0, 0.5, 1].map((v) => [String(v), valueY(v, rect)]));
  ctx.save();
  ctx.translate(9, rect.y + rect.h / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.fillText(label, 0, 0);
  ctx.restore();
}

/** Draw the chart state onto the canvas at its current CSS size and device pixel ratio. */
function draw(chart) {
  const { canvas, run, hover } = chart;
  const begun = beginPanel(canvas);
  if (!begun) return;
  const { ctx, width, height, colors } = begun;
  ctx.fillStyle = colors.fg;
  if (!run) {
    ctx.textAlign = "center";
    ctx.fillText("Queue the workflow: the router's weights appear here step by step.", width / 2, height / 2);
    return;
  }
  const areas = layout(width, height);
  const pts = points(run);
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  const status = run.done ? `${pts.length} steps` : `step ${pts.length} / ${run.total || "?"}`;
  ctx.fillText(`${run.title || "FeRA routing"}   ${status}`, areas.weights.x, 3);
  panel(ctx, areas.weights, colors, "weight");
  panel(ctx, areas.energies, colors, "energy");

  // stacked band energies, lowest band at the bottom
  const rect = areas.energies;
  for (let k = run.bands - 1; k >= 0; k--) {
    ctx.beginPath();
    pts.forEach((p, i) => {
      const top = p.energies.slice(0, k + 1).reduce((a, b) => a + b, 0);
      const x = stepX(run, p.step, rect);
      i === 0 ? ctx.moveTo(x, valueY(top, rect)) : ctx.lineTo(x, valueY(top, rect));
    });
    if (pts.length) {
      ctx.lineTo(stepX(run, pts[pts.length - 1].step, rect), valueY(0, rect));
      ctx.lineTo(stepX(run, pts[0].step, rect), valueY(0, rect));
      ctx.closePath();
      ctx.fillStyle = colorOf(run, "bands", k, colors.fg);
      ctx.fill();
    }
  }
  drawSchedule(ctx, run, areas.weights, colors);
  // router weight per expert: cond solid, uncond dashed
  for (const label of Object.keys(DASH)) {
    for (let m = 0; m < run.experts; m++) {
      const line = pts.filter((p) => p.weights[label]);
      if (!line.length) continue;
      ctx.beginPath();
      ctx.setLineDash(DASH[label]);
      ctx.strokeStyle = colorOf(run, "experts", m, colors.fg);
      ctx.lineWidth = 1.5;
      line.forEach((p, i) => {
        const x = stepX(run, p.step, areas.weights), y = valueY(p.weights[label][m], areas.weights);
        i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y);
      });
      ctx.stroke();
    }
  }
  ctx.setLineDash([]);
  // legend and x axis
  ctx.textBaseline = "top";
  ctx.textAlign = "right";
  ctx.fillStyle = colors.fg;
  ctx.fillText("step", rect.x + rect.w, rect.y + rect.h + 3);
  for (let m = 0; m < run.experts; m++) {
    ctx.fillStyle = colorOf(run, "experts", m, colors.fg);
    ctx.fillText(`expert ${m}`, areas.weights.x + areas.weights.w - 4, areas.weights.y + 3 + 11 * m);
  }
  // hover: the nearest step's values
  if (hover != null && pts.length) {
    const i = nearest(run, pts, hover, areas.weights);
    const x = stepX(run, pts[i].step, areas.weights);
    ctx.strokeStyle = colors.fg;
    ctx.beginPath();
    ctx.moveTo(x, areas.weights.y);
    ctx.lineTo(x, rect.y + rect.h);
    ctx.stroke();
    const lines = describe(pts[i]);
    const w = Math.max(...lines.map((l) => ctx.measureText(l).width)) + 8;
    const bx = Math.min(x + 6, width - w - 2), by = areas.weights.y + 2;
    ctx.fillStyle = colors.bg;
    ctx.globalAlpha = 0.9;
    ctx.fillRect(bx, by, w, 12 * lines.length + 4);
    ctx.globalAlpha = 1;
    ctx.fillStyle = colors.fg;
    ctx.textAlign = "left";
    lines.forEach((l, j) => ctx.fillText(l, bx + 4, by + 2 + 12 * j));
  }
}

/** A drawn expert schedule, wide and faint under the router's lines (in its expert's colour). */
function drawSchedule(ctx, run, rect, colors) {
  ctx.save();
  ctx.globalAlpha = 0.4;
  ctx.lineWidth = 6;
  ctx.lineJoin = ctx.lineCap = "round";
  for (const { expert, points: line } of scheduleLines(run)) {
    ctx.strokeStyle = colorOf(run, "experts", expert, colors.fg);
    ctx.beginPath();
    line.forEach((p, i) => {
      const x = stepX(run, p.step, rect), y = valueY(p.value, rect);
      i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
  ctx.restore();
}

function latentSource(node) {
  const slot = node.inputs?.findIndex((i) => i.name === "latent") ?? -1;
  return slot >= 0 ? node.getInputNode?.(slot)?.id ?? null : null;
}

const charts = new Set();

app.registerExtension({
  name: "fera.routingChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      const canvas = document.createElement("canvas");
      canvas.style.width = "100%";
      canvas.style.height = "100%";
      canvas.title = "Router weight per expert (cond solid, uncond dashed) and stacked band energies per step.";
      const chart = { node: this, canvas, run: null, hover: null, drawn: "" };
      this.feraChart = chart;
      const widget = this.addDOMWidget("fera_chart", "canvas", canvas, { serialize: false, getMinHeight: () => 180 });
      widget.serialize = false; // options.serialize keeps it out of the prompt, this out of widgets_values
      canvas.addEventListener("mousemove", (e) => {
        chart.hover = eventXY(canvas, e).x;
        draw(chart);
      });
      canvas.addEventListener("mouseleave", () => { chart.hover = null; draw(chart); });
      new ResizeObserver(() => draw(chart)).observe(canvas);
      charts.add(chart);
      const removed = this.onRemoved;
      this.onRemoved = function () { charts.delete(chart); return removed?.apply(this, arguments); };
      this.setSize([Math.max(this.size[0], 360), Math.max(this.size[1], 300)]);
      return result;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      executed?.apply(this, arguments);
      const data = message?.fera_trace?.[0];
      if (data && this.feraChart) { this.feraChart.run = fromOutput(data); draw(this.feraChart); }
    };
    // Canvas zoom scales the widget without resizing it: redraw when the on-screen size changes.
    const foreground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function () {
      const chart = this.feraChart;
      const key = chart && screenKey(chart.canvas);
      if (chart && key !== chart.drawn) { chart.drawn = key; draw(chart); }
      return foreground?.apply(this, arguments);
    };
  },
  setup() {
    api.addEventListener("fera.trace", ({ detail }) => {
      for (const chart of charts) {
        if (!isFor(detail, latentSource(chart.node))) continue;
        chart.run = applyEvent(chart.run, detail);
        draw(chart);
      }
    });
    // Theme switches change CSS variables on the document: redraw with the new colours.
    const redraw = () => charts.forEach(draw);
    new MutationObserver(redraw).observe(document.documentElement, { attributes: true });
    new MutationObserver(redraw).observe(document.body, { attributes: true, attributeFilter: ["class"] });
  },
});
