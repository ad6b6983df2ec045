// The text Train FeRA shows while it trains: pure, so node --test can check it without a browser.
export function trainingText({ step, total, loss }) {
  const value = Number.isFinite(loss) ? loss.toPrecision(4) : String(loss);
  return `step ${step}/${total}  loss ${value}`;
}
