// node --test tests/js : the FeRA Schedule editor's data (web/fera_schedule_data.js).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import {
  MIN_GAP, addKeyframe, deleteKeyframe, emptySchedule, fromXY, hitTest, legendBoxes, moveKeyframe, parseSchedule,
  plotArea, resize, serialize, snap, structureThenTexture, toXY, valueAt, valuesAt, weightTop,
} from "../../web/fera_schedule_data.js";

const cases = JSON.parse(readFileSync(new URL("../fixtures/schedule_cases.json", import.meta.url)));
const close = (a, b) => assert.ok(Math.abs(a - b) < 1e-12, `${a} != ${b}`);

test("curves are linear between keyframes, hold beyond them, and are null without keyframes", () => {
  const curve = [[0.2, 1], [0.6, 0]];
  assert.equal(valueAt(curve, 0), 1);
  close(valueAt(curve, 0.3), 0.75); // 1 - (0.3 - 0.2) / 0.4, by hand
  close(valueAt(curve, 0.5), 0.25);
  assert.equal(valueAt(curve, 0.95), 0);
  assert.equal(valueAt([], 0.5), null);
  assert.deepEqual(valuesAt({ curves: [[[0.5, 0.25]], []] }, 0.9), [0.25, null]);
});

test("the widget's text round-trips; what Python refuses is refused here too", () => {
  for (const data of cases.valid) {
    const { schedule, error } = parseSchedule(JSON.stringify(data));
    assert.equal(error, undefined);
    const text = serialize(schedule);
    assert.deepEqual(JSON.parse(text), { format: "fera.expert_schedule", version: 1, curves: data.curves });
    assert.equal(serialize(parseSchedule(text).schedule), text);
  }
  for (const data of cases.invalid) assert.ok(parseSchedule(JSON.stringify(data)).error, JSON.stringify(data));
  assert.match(parseSchedule("{oops").error, /not JSON/);
  assert.deepEqual(emptySchedule(2), { curves: [[], []] });
});

test("adding keeps percents in order and reuses a keyframe that is too close", () => {
  let { schedule, index } = addKeyframe(emptySchedule(2), 1, 0.5, 0.4);
  assert.equal(index, 0);
  ({ schedule, index } = addKeyframe(schedule, 1, 0.2, 0.9));
  assert.equal(index, 0);
  ({ schedule, index } = addKeyframe(schedule, 1, 0.8, -3)); // weights are never negative
  assert.equal(index, 2);
  assert.deepEqual(schedule.curves, [[], [[0.2, 0.9], [0.5, 0.4], [0.8, 0]]]);
  ({ schedule, index } = addKeyframe(schedule, 1, 0.5 + MIN_GAP / 2, 0.7));
  assert.equal(index, 1);
  assert.deepEqual(schedule.curves[1], [[0.2, 0.9], [0.5, 0.7], [0.8, 0]]);
});

test("dragging stays between the neighbours, in 0..1 and non-negative; deleting removes one keyframe", () => {
  const start = { curves: [[[0.2, 1], [0.5, 0.5], [0.8, 0]]] };
  assert.deepEqual(moveKeyframe(start, 0, 1, 0.95, 2).curves[0][1], [0.8 - MIN_GAP, 2]);
  assert.deepEqual(moveKeyframe(start, 0, 1, 0.0, -1).curves[0][1], [0.2 + MIN_GAP, 0]);
  assert.deepEqual(moveKeyframe(start, 0, 0, -0.5, 0.3).curves[0][0], [0, 0.3]);
  assert.deepEqual(moveKeyframe(start, 0, 2, 1.5, 0.3).curves[0][2], [1, 0.3]);
  assert.deepEqual(deleteKeyframe(start, 0, 1).curves[0], [[0.2, 1], [0.8, 0]]);
  assert.deepEqual(start.curves[0].length, 3); // edits return a new schedule
  assert.ok(parseSchedule(serialize(moveKeyframe(start, 0, 1, 0.21, 0))).schedule); // still valid
});

test("presets: structure then texture sums to 1 everywhere; resizing keeps the drawn curves", () => {
  for (const m of [1, 2, 3, 5]) {
    const s = structureThenTexture(m);
    assert.equal(s.curves.length, m);
    for (const p of [0, 0.1, 0.37, 0.5, 0.9, 1]) close(valuesAt(s, p).reduce((a, b) => a + b, 0), 1);
    assert.ok(!parseSchedule(serialize(s)).error);
  }
  const s3 = structureThenTexture(3);
  assert.deepEqual(s3.curves[0], [[0, 1], [0.5, 0]]);
  assert.equal(valuesAt(s3, 0)[0], 1);
  assert.equal(valuesAt(s3, 1)[2], 1);
  assert.deepEqual(resize(s3, 4).curves, [...s3.curves, []]);
  assert.deepEqual(resize(s3, 2).curves, s3.curves.slice(0, 2));
  assert.equal(resize(s3, 99).curves.length, 8);
  assert.equal(snap(0.437, 0.05), 0.45);
});

test("geometry: percent and weight map to the plot and back; the top grows with the weights", () => {
  const rect = plotArea(300, 200);
  assert.ok(rect.x > 0 && rect.y > 0 && rect.x + rect.w <= 300 && rect.y + rect.h <= 200);
  const at = toXY(0.25, 0.5, rect, 1);
  assert.deepEqual(at, { x: rect.x + rect.w / 4, y: rect.y + rect.h / 2 });
  const back = fromXY(at.x, at.y, rect, 1);
  close(back.percent, 0.25);
  close(back.weight, 0.5);
  assert.deepEqual(fromXY(-50, 1000, rect, 2), { percent: 0, weight: 0 });
  assert.equal(weightTop(emptySchedule(3)), 1);
  assert.equal(weightTop({ curves: [[[0.5, 1.1]]] }), 1.25);
});

test("hit-testing: legend, then the nearest keyframe, then the nearest curve, else nothing", () => {
  const rect = plotArea(400, 240);
  const s = { curves: [[[0, 1], [1, 0]], [[0.5, 0.5]], []] };
  const box = legendBoxes(3, rect)[2];
  assert.deepEqual(hitTest(s, box.x + 2, box.y + 2, rect, 1), { kind: "legend", expert: 2 });
  const key = toXY(0.5, 0.5, rect, 1); // expert 1's keyframe lies on expert 0's line too
  assert.deepEqual(hitTest(s, key.x + 3, key.y - 2, rect, 1), { kind: "key", expert: 1, index: 0 });
  const onLine = toXY(0.25, 0.75, rect, 1);
  assert.deepEqual(hitTest(s, onLine.x, onLine.y + 4, rect, 1), { kind: "curve", expert: 0 });
  const flat = toXY(0.9, 0.5, rect, 1);
  assert.deepEqual(hitTest(s, flat.x, flat.y + 3, rect, 1), { kind: "curve", expert: 1 });
  const empty = toXY(0.25, 0.2, rect, 1);
  assert.equal(hitTest(s, empty.x, empty.y, rect, 1), null);
  assert.equal(hitTest(s, rect.x + rect.w + 40, rect.y + 5, rect, 1), null);
  const corner = toXY(0, 1, rect, 1);
  assert.deepEqual(hitTest(s, corner.x - 4, corner.y, rect, 1), { kind: "key", expert: 0, index: 0 });
});

test("the routing chart draws a drawn schedule at each step's percent, ahead of the router when live", async () => {
  const { applyEvent, fromOutput, scheduleLines } = await import("../../web/fera_chart_data.js");
  const schedule = { format: "fera.expert_schedule", version: 1, curves: [[[0.25, 1], [0.75, 0]], [], [[0, 0.5]]] };
  const row = (step, percent) => ({ step, percent, sigma: 1 - percent, cond: "cond", weights: [0.2, 0.3, 0.5], energies: [1] });
  const done = fromOutput({ run: "r", schedule, rows: [row(0, 0), row(1, 0.5), row(2, 1)] });
  assert.deepEqual(scheduleLines(done), [
    { expert: 0, points: [{ step: 0, value: 1 }, { step: 1, value: 0.5 }, { step: 2, value: 0 }] },
    { expert: 2, points: [{ step: 0, value: 0.5 }, { step: 1, value: 0.5 }, { step: 2, value: 0.5 }] },
  ]); // expert 1 has no curve: the router's line alone
  let live = applyEvent(null, { kind: "start", run: "l", total: 4, schedule, percents: [0, 0.25, 0.5, 0.75] });
  live = applyEvent(live, { kind: "step", run: "l", rows: [{ ...row(0, null) }] });
  assert.deepEqual(scheduleLines(live)[0].points.map((p) => p.value), [1, 1, 0.5, 0]);
  assert.deepEqual(scheduleLines(fromOutput({ run: "x", rows: [row(0, 0)] })), []); // no schedule, no layer
});
