// node --test tests/js/*.test.mjs : the routing chart's data handling (web/fera_chart_data.js).
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  addRows, applyEvent, colorOf, describe, fromOutput, isFor, layout, nearest, newRun, palette, points, stepX, valueY,
} from "../../web/fera_chart_data.js";

const row = (step, cond, weights, energies, sigma = 10 - step) => ({ step, sigma, cond, row: 0, weights, energies });

test("rows reduce to per-step means of cond and uncond weights and of energies", () => {
  const run = addRows(newRun({ run: "r", total: 3 }), [
    row(0, "cond", [1, 0], [0.9, 0.1]), row(0, "cond", [0.5, 0.5], [0.7, 0.3]),
    row(0, "uncond", [0, 1], [0.8, 0.2]), row(1, "cond", [0.2, 0.8], [0.4, 0.6]),
  ]);
  const pts = points(run);
  assert.equal(pts.length, 2);
  assert.deepEqual(pts[0].weights, { cond: [0.75, 0.25], uncond: [0, 1] });
  assert.ok(Math.abs(pts[0].energies[0] - 0.8) < 1e-12 && Math.abs(pts[0].energies[1] - 0.2) < 1e-12);
  assert.equal(pts[0].sigma, 10);
  assert.deepEqual(pts[1].weights, { cond: [0.2, 0.8] });
  assert.equal(run.experts, 2);
  assert.equal(run.bands, 2);
});

test("points are in step order whatever order rows arrive in; rows without cond go to 'all'", () => {
  const run = addRows(newRun(), [row(2, null, [1], [1]), row(0, null, [0], [1]), row(1, null, [0.5], [1])]);
  assert.deepEqual(points(run).map((p) => [p.step, p.weights.all[0]]), [[0, 0], [1, 0.5], [2, 1]]);
});

test("live events: start makes a new run, steps add, end finishes, other runs are ignored", () => {
  let run = applyEvent(null, { kind: "step", run: "old", rows: [row(0, "cond", [1], [1])] });
  assert.equal(run, null);
  run = applyEvent(run, { kind: "start", run: "a", node: "3", title: "t", experts: 2, bands: 3, total: 4 });
  assert.equal(run.title, "t");
  assert.equal(run.total, 4);
  run = applyEvent(run, { kind: "step", run: "a", step: 0, rows: [row(0, "cond", [1, 0], [1, 0, 0])] });
  run = applyEvent(run, { kind: "step", run: "b", step: 0, rows: [row(1, "cond", [0, 1], [1, 0, 0])] });
  assert.equal(points(run).length, 1);
  assert.equal(run.done, false);
  run = applyEvent(run, { kind: "end", run: "a" });
  assert.equal(run.done, true);
  const next = applyEvent(run, { kind: "start", run: "c", total: 2 });
  assert.notEqual(next, run); // a re-queue replaces the chart's run
  assert.equal(points(next).length, 0);
});

test("the finished output replaces whatever was shown", () => {
  const run = fromOutput({ run: "x", title: "adapter", experts: 3, bands: 3, rows: [row(0, "cond", [0.2, 0.3, 0.5], [0.5, 0.3, 0.2])] });
  assert.equal(run.done, true);
  assert.equal(run.total, 1);
  assert.deepEqual(points(run)[0].weights.cond, [0.2, 0.3, 0.5]);
});

test("events are matched to the trace node fed by the sampler that runs", () => {
  assert.ok(isFor({ node: "3" }, 3));
  assert.ok(!isFor({ node: "4" }, 3));
  assert.ok(isFor({ node: "12:3" }, 3)); // inside a subgraph
  assert.ok(isFor({ node: "4" }, null)); // unconnected: show any run
});

test("geometry: panels inside the canvas, steps span the width, values clamp to the panel, hover picks the nearest", () => {
  const { weights, energies } = layout(300, 200);
  assert.ok(weights.y + weights.h < energies.y && energies.y + energies.h <= 200 && weights.x + weights.w <= 300);
  const run = addRows(newRun({ total: 5 }), [0, 1, 2].map((s) => row(s, "cond", [1], [1])));
  assert.equal(stepX(run, 0, weights), weights.x);
  assert.equal(stepX(run, 4, weights), weights.x + weights.w);
  assert.equal(valueY(1, weights), weights.y);
  assert.equal(valueY(-3, weights), weights.y + weights.h);
  const pts = points(run);
  assert.equal(nearest(run, pts, stepX(run, 2, weights) - 3, weights), 2);
  assert.equal(nearest(run, pts, 0, weights), 0);
  assert.equal(nearest(run, [], 10, weights), -1);
  const tiny = layout(10, 10);
  assert.ok(tiny.weights.w > 0 && tiny.energies.h > 0);
});

test("tooltip text names step, sigma and values", () => {
  const [p] = points(addRows(newRun(), [row(3, "cond", [0.25, 0.75], [0.6, 0.4], 2.5), row(3, "uncond", [0.5, 0.5], [0.6, 0.4], 2.5)]));
  assert.deepEqual(describe(p), ["step 3   sigma 2.50", "cond: e0 0.250  e1 0.750", "uncond: e0 0.500  e1 0.500", "bands: 0.600 / 0.400"]);
});

test("palette follows the theme's CSS variables, with light fallbacks; it holds no data colours", () => {
  assert.equal(palette({ "--fg-color": " #ddd", "--comfy-input-bg": "#222" }).fg, "#ddd");
  assert.equal(palette({ "--fg-color": "#ddd", "--comfy-input-bg": "#222" }).bg, "#222");
  assert.equal(palette().fg, "#222");
  assert.equal(palette().bg, "#fff");
  assert.deepEqual(Object.keys(palette()).sort(), ["bg", "fg", "grid"]); // experts and bands: colorOf
});

// what fera_core/plot.py's palette(3, 3) sends (the values do not matter here, only where they go)
const COLORS = { experts: ["#e0", "#e1", "#e2"], bands: ["#b0", "#b1", "#b2"] };

test("experts and bands are drawn in the colours the server sends with the run, never each other's", () => {
  const live = applyEvent(null, { kind: "start", run: "a", experts: 3, bands: 3, total: 2, colors: COLORS });
  const done = fromOutput({ run: "a", experts: 3, bands: 3, colors: COLORS, rows: [row(0, "cond", [1, 0, 0], [1, 0, 0])] });
  for (const run of [live, done]) {
    assert.deepEqual([0, 1, 2].map((m) => colorOf(run, "experts", m, "fg")), COLORS.experts);
    assert.deepEqual([0, 1, 2].map((k) => colorOf(run, "bands", k, "fg")), COLORS.bands);
  }
  assert.equal(colorOf(live, "experts", 4, "fg"), "#e1"); // more experts than colours: cycle
  assert.equal(colorOf(newRun({ run: "old" }), "bands", 0, "fg"), "fg"); // no colours sent: the text colour
});
