import { test } from "node:test";
import assert from "node:assert/strict";
import { trainingText } from "../../web/fera_train_text.js";

test("step, total and loss to four significant digits", () => {
  assert.equal(trainingText({ step: 3, total: 200, loss: 0.0123456 }), "step 3/200  loss 0.01235");
});

test("a non-finite loss is shown as it is", () => {
  assert.equal(trainingText({ step: 1, total: 5, loss: NaN }), "step 1/5  loss NaN");
});
