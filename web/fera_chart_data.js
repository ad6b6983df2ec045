// Data handling of the FeRA routing chart: plain functions, no DOM (tested with `node --test`).
// A run collects the rows of a routing trace (live "fera.trace" events or the trace node's
// finished output) and reduces them to one point per sampling step: the mean router weights of the
// cond and uncond rows, and the mean band energies. A run with a drawn expert schedule also has the
// schedule and its percent at every step, where the chart draws it.
import { readSchedule, valueAt } from "./fera_schedule_data.js";

export const LABELS = ["cond", "uncond", "all"]; // "all": rows traced without cond/uncond

/** colors: {experts: [hex], bands: [hex]}, the palette of fera_core/plot.py that the server sends with
 * the run (the same colours as the Routing Plot image; no copy here). schedule: the drawn expert schedule
 * (fera_core/schedule.py's JSON form) the run was blended with, and percents: each step's schedule percent. */
export function newRun({ run = null, node = null, title = "", experts = 0, bands = 0, total = 0, colors = null,
  schedule = null, percents = null } = {}) {
  return { run, node, title, experts, bands, total, colors, schedule, percents, done: false, steps: new Map() };
}

/** Colour of expert or band `i` (kind "experts" | "bands") of a run, cycling through what the server
 * sent; `fallback` (the theme's text colour) when it sent none. */
export function colorOf(run, kind, i, fallback) {
  return cycle(run.colors?.[kind], i, fallback);
}

/** Entry `i` of a colour list, cycling; `fallback` when the list is missing or empty. */
export function cycle(list, i, fallback) {
  return list?.length ? list[i % list.length] : fallback;
}

function add(into, values) {
  values.forEach((v, i) => { into[i] = (into[i] ?? 0) + v; });
}

/** Add trace rows ({step, sigma, cond, energies, weights}) to a run; returns the run. */
export function addRows(run, rows) {
  for (const r of rows) {
    const step = r.step ?? 0;
    let s = run.steps.get(step);
    if (!s) {
      s = { step, sigma: r.sigma ?? null, percent: r.percent ?? null, weights: {}, energies: { sum: [], n: 0 } };
      run.steps.set(step, s);
    }
    const label = r.cond ?? "all";
    const w = (s.weights[label] ??= { sum: [], n: 0 });
    add(w.sum, r.weights);
    w.n += 1;
    add(s.energies.sum, r.energies);
    s.energies.n += 1;
    run.experts = Math.max(run.experts, r.weights.length);
    run.bands = Math.max(run.bands, r.energies.length);
  }
  return run;
}

/** One point per step, in step order: {step, sigma, percent, weights: {label: mean[]}, energies: mean[]}. */
export function points(run) {
  return [...run.steps.values()]
    .sort((a, b) => a.step - b.step)
    .map((s) => ({
      step: s.step,
      sigma: s.sigma,
      percent: s.percent ?? run.percents?.[s.step] ?? null,
      weights: Object.fromEntries(Object.entries(s.weights).map(([k, v]) => [k, v.sum.map((x) => x / v.n)])),
      energies: s.energies.sum.map((x) => x / s.energies.n),
    }));
}

/** The finished run from the trace node's output (`message.fera_trace[0]`). */
export function fromOutput(data) {
  const run = addRows(newRun(data), data.rows ?? []);
  run.total = Math.max(run.total, run.steps.size);
  run.done = true;
  return run;
}

/** The drawn schedule at each step's percent, for the experts with a curve: [{expert, points: [{step, value}]}].
 * Live runs know every step's percent from the start, so the schedule is drawn ahead of the router. */
export function scheduleLines(run) {
  const schedule = run.schedule && readSchedule(run.schedule).schedule;
  if (!schedule) return [];
  const steps = run.percents ? run.percents.map((percent, step) => ({ step, percent }))
    : points(run).filter((p) => p.percent != null);
  return schedule.curves.map((curve, expert) => ({
    expert, points: steps.map(({ step, percent }) => ({ step, value: valueAt(curve, percent) })),
  })).filter(({ expert, points: line }) => schedule.curves[expert].length && line.length);
}

/** Apply a "fera.trace" event (kind start | step | end) to `current`; returns the run to show. */
export function applyEvent(current, ev) {
  if (ev.kind === "start") return newRun(ev);
  if (!current || current.run !== ev.run) return current; // an event of another run
  if (ev.kind === "step") addRows(current, ev.rows ?? []);
  if (ev.kind === "end") current.done = true;
  return current;
}

/** Whether a live event is for a trace node whose latent comes from `sourceId` (null: unknown, accept). */
export function isFor(ev, sourceId) {
  return sourceId == null || ev.node == null || String(ev.node) === String(sourceId)
    || String(ev.node).endsWith(`:${sourceId}`); // node ids inside subgraphs are "outer:inner"
}

/** Plot areas (CSS pixels) of the weight panel (top) and the energy panel (bottom). */
export function layout(width, height) {
  const left = 34, right = 8, top = 18, gap = 14, bottom = 16;
  const h = Math.max(height - top - gap - bottom, 2);
  const w = Math.max(width - left - right, 2);
  const hTop = Math.round(h * 0.55);
  return {
    weights: { x: left, y: top, w, h: hTop },
    energies: { x: left, y: top + hTop + gap, w, h: h - hTop },
  };
}

/** x position (CSS pixels) of a step: the whole planned schedule spans the width. */
export function stepX(run, step, rect) {
  const last = Math.max((run.total || run.steps.size) - 1, 1);
  return rect.x + (rect.w * step) / last;
}

export function valueY(value, rect) {
  return rect.y + rect.h * (1 - Math.min(Math.max(value, 0), 1));
}

/** Index of the point nearest to CSS x (for hovering), or -1 when there are none. */
export function nearest(run, pts, x, rect) {
  let best = -1, dist = Infinity;
  pts.forEach((p, i) => {
    const d = Math.abs(stepX(run, p.step, rect) - x);
    if (d < dist) { best = i; dist = d; }
  });
  return best;
}

const fmt = (v) => (v == null ? "?" : Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(3));

/** Tooltip lines for one point. */
export function describe(point) {
  const lines = [`step ${point.step}   sigma ${fmt(point.sigma)}`];
  for (const label of LABELS) {
    const w = point.weights[label];
    if (w) lines.push(`${label}: ${w.map((v, m) => `e${m} ${v.toFixed(3)}`).join("  ")}`);
  }
  lines.push(`bands: ${point.energies.map((v) => v.toFixed(3)).join(" / ")}`);
  return lines;
}

/** Theme colours (text, background, grid) from the frontend's CSS variables (light theme fallbacks);
 * the data colours come with the run (colorOf). */
export function palette(css = {}) {
  const fg = (css["--fg-color"] || "").trim() || "#222";
  const bg = (css["--comfy-input-bg"] || css["--bg-color"] || "").trim() || "#fff";
  const grid = (css["--border-color"] || "").trim() || "#8884";
  return { fg, bg, grid };
}
