// The FeRA Schedule editor's data: plain functions, no DOM (tested with `node --test`).
// A schedule is {curves: [[[percent, weight], ...] per expert]}, percents rising strictly in each
// curve; its JSON form (with format and version) is the widget's value and what Python reads
// (fera_core/schedule.py, which refuses what this module would never write). The interpolation
// here only draws: curves are linear between keyframes and hold their end values; an expert
// without keyframes keeps the router's weight (null here).

export const FORMAT = "fera.expert_schedule";
export const VERSION = 1;
export const MAX_EXPERTS = 8;
export const MIN_GAP = 0.001; // smallest percent between two keyframes of a curve
export const SNAP = { percent: 0.05, weight: 0.05 };

const round = (v) => Math.round(v * 1e4) / 1e4;
const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);

export function emptySchedule(experts = 3) {
  return { curves: Array.from({ length: experts }, () => []) };
}

export function serialize(schedule) {
  return JSON.stringify({ format: FORMAT, version: VERSION, curves: schedule.curves });
}

/** {schedule} from the widget's text, or {error} saying what is wrong with it. */
export function parseSchedule(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (err) {
    return { error: `not JSON (${err.message})` };
  }
  return readSchedule(data);
}

/** {schedule} from the JSON form (as Python sends it), or {error}. */
export function readSchedule(data) {
  if (!data || !Array.isArray(data.curves) || !data.curves.length || data.curves.length > MAX_EXPERTS) {
    return { error: `expected {"curves": [...]} with 1 to ${MAX_EXPERTS} expert curves` };
  }
  if ((data.format ?? FORMAT) !== FORMAT || (data.version ?? VERSION) !== VERSION) {
    return { error: `not a ${FORMAT} version ${VERSION}` };
  }
  for (const [m, curve] of data.curves.entries()) {
    const ok = Array.isArray(curve) && curve.every((k, i) => Array.isArray(k) && k.length === 2
      && k.every(Number.isFinite) && k[0] >= 0 && k[0] <= 1 && k[1] >= 0 && (i === 0 || k[0] > curve[i - 1][0]));
    if (!ok) return { error: `expert ${m}: keyframes must be [percent 0..1, weight >= 0] with rising percents` };
  }
  return { schedule: { curves: data.curves.map((c) => c.map(([p, w]) => [p, w])) } };
}

/** A curve's weight at `percent`, or null for a curve without keyframes. */
export function valueAt(curve, percent) {
  if (!curve.length) return null;
  if (percent <= curve[0][0]) return curve[0][1];
  for (let i = 1; i < curve.length; i++) {
    const [p0, w0] = curve[i - 1], [p1, w1] = curve[i];
    if (percent <= p1) return w0 + ((w1 - w0) * (percent - p0)) / (p1 - p0);
  }
  return curve[curve.length - 1][1];
}

export function valuesAt(schedule, percent) {
  return schedule.curves.map((c) => valueAt(c, percent));
}

const withCurve = (schedule, m, curve) => ({ curves: schedule.curves.map((c, i) => (i === m ? curve : c)) });

/** Add a keyframe to expert m's curve: {schedule, index}. Within MIN_GAP of a keyframe, that one takes the weight. */
export function addKeyframe(schedule, m, percent, weight) {
  const p = round(clamp(percent, 0, 1)), w = round(Math.max(weight, 0));
  const curve = schedule.curves[m];
  const near = curve.findIndex(([q]) => Math.abs(q - p) < MIN_GAP);
  if (near >= 0) return { schedule: withCurve(schedule, m, curve.map((k, i) => (i === near ? [k[0], w] : k))), index: near };
  const index = curve.filter(([q]) => q < p).length;
  return { schedule: withCurve(schedule, m, [...curve.slice(0, index), [p, w], ...curve.slice(index)]), index };
}

/** Move keyframe i of expert m, kept between its neighbours (MIN_GAP apart), in 0..1 and at weight >= 0. */
export function moveKeyframe(schedule, m, i, percent, weight) {
  const curve = schedule.curves[m];
  const lo = i > 0 ? curve[i - 1][0] + MIN_GAP : 0, hi = i < curve.length - 1 ? curve[i + 1][0] - MIN_GAP : 1;
  const key = [round(clamp(percent, lo, hi)), round(Math.max(weight, 0))];
  return withCurve(schedule, m, curve.map((k, j) => (j === i ? key : k)));
}

export function deleteKeyframe(schedule, m, i) {
  return withCurve(schedule, m, schedule.curves[m].filter((_, j) => j !== i));
}

/** The schedule with `experts` curves: new experts start without keyframes, removed ones are dropped. */
export function resize(schedule, experts) {
  const n = clamp(Math.round(experts) || 1, 1, MAX_EXPERTS);
  return { curves: Array.from({ length: n }, (_, m) => schedule.curves[m] ?? []) };
}

/** Preset: the first expert strong at the start, the last at the end, the others peaking in between
 * (triangles that sum to 1 at every percent, as the router's weights do). */
export function structureThenTexture(experts) {
  if (experts === 1) return { curves: [[[0, 1]]] };
  const at = (m) => round(m / (experts - 1));
  return {
    curves: Array.from({ length: experts }, (_, m) =>
      [m - 1, m, m + 1].filter((j) => j >= 0 && j < experts).map((j) => [at(j), j === m ? 1 : 0])),
  };
}

export function snap(value, step) {
  return round(Math.round(value / step) * step);
}

// ------------------------------------------------------------------ geometry (CSS pixels)

/** The plot area of a canvas of this size. */
export function plotArea(width, height) {
  const left = 30, right = 8, top = 20, bottom = 16;
  return { x: left, y: top, w: Math.max(width - left - right, 2), h: Math.max(height - top - bottom, 2) };
}

/** The weight at the top of the plot: 1, or the largest keyframe weight rounded up to a quarter. */
export function weightTop(schedule) {
  const most = Math.max(1, ...schedule.curves.flat().map(([, w]) => w));
  return Math.ceil(most * 4) / 4;
}

export function toXY(percent, weight, rect, top) {
  return { x: rect.x + rect.w * percent, y: rect.y + rect.h * (1 - weight / top) };
}

export function fromXY(x, y, rect, top) {
  return { percent: clamp((x - rect.x) / rect.w, 0, 1), weight: clamp((1 - (y - rect.y) / rect.h) * top, 0, top) };
}

/** The legend's box for each expert, in a row above the plot. */
export function legendBoxes(experts, rect) {
  return Array.from({ length: experts }, (_, m) => ({ x: rect.x + 58 * m, y: 2, w: 54, h: 14 }));
}

const inside = (b, x, y) => x >= b.x && x <= b.x + b.w && y >= b.y && y <= b.y + b.h;

/** What is under (x, y): {kind: "legend" | "key" | "curve", expert, index?} (keyframes before curves,
 * the nearest within `radius`), or null for empty plot space or outside the plot. */
export function hitTest(schedule, x, y, rect, top, radius = 7) {
  const legend = legendBoxes(schedule.curves.length, rect).findIndex((b) => inside(b, x, y));
  if (legend >= 0) return { kind: "legend", expert: legend };
  let best = null, dist = radius;
  schedule.curves.forEach((curve, m) => curve.forEach(([p, w], index) => {
    const at = toXY(p, w, rect, top), d = Math.hypot(at.x - x, at.y - y);
    if (d <= dist) { best = { kind: "key", expert: m, index }; dist = d; }
  }));
  if (best || !inside({ x: rect.x - radius, y: rect.y - radius, w: rect.w + 2 * radius, h: rect.h + 2 * radius }, x, y)) {
    return best;
  }
  const { percent } = fromXY(x, y, rect, top);
  schedule.curves.forEach((curve, m) => {
    const w = valueAt(curve, percent);
    const d = w == null ? Infinity : Math.abs(toXY(percent, w, rect, top).y - y);
    if (d <= dist) { best = { kind: "curve", expert: m }; dist = d; }
  });
  return best;
}
