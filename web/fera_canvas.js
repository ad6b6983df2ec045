// Canvases inside nodes (DOM widgets): sharp at any canvas zoom and screen pixel ratio, in the theme's colours.
import { palette } from "./fera_chart_data.js";

/** Size the backing store to the on-screen size times the pixel ratio (canvas zoom scales a DOM widget
 * without resizing it) and draw in CSS pixels: {ctx, width, height}, or null while it has no size. */
export function fitCanvas(canvas) {
  const box = canvas.getBoundingClientRect();
  const scale = (window.devicePixelRatio || 1) * (box.width / Math.max(canvas.clientWidth, 1) || 1);
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (!width || !height) return null;
  const pw = Math.round(width * scale), ph = Math.round(height * scale);
  if (canvas.width !== pw || canvas.height !== ph) { canvas.width = pw; canvas.height = ph; }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(scale, 0, 0, scale, 0, 0);
  return { ctx, width, height };
}

/** fitCanvas, then the panel's background in the theme's colours and the 10px font every panel uses:
 * {ctx, width, height, colors}, or null while the canvas has no size. */
export function beginPanel(canvas) {
  const fit = fitCanvas(canvas);
  if (!fit) return null;
  const colors = themeColors();
  fit.ctx.fillStyle = colors.bg;
  fit.ctx.fillRect(0, 0, fit.width, fit.height);
  fit.ctx.font = "10px sans-serif";
  return { ...fit, colors };
}

/** What fitCanvas depends on: redraw when it changes (checked at every frame the node is drawn). */
export function screenKey(canvas) {
  const box = canvas.getBoundingClientRect();
  return `${Math.round(box.width)}x${Math.round(box.height)}@${window.devicePixelRatio}`;
}

/** A CSS pixel position inside the canvas of a mouse event, whatever the zoom. */
export function eventXY(canvas, e) {
  const box = canvas.getBoundingClientRect();
  return { x: (e.clientX - box.left) * (canvas.clientWidth / Math.max(box.width, 1)),
           y: (e.clientY - box.top) * (canvas.clientHeight / Math.max(box.height, 1)) };
}

/** A panel's frame and its value labels left of it: ticks [[label, y], ...]. */
export function framePanel(ctx, rect, colors, ticks) {
  ctx.strokeStyle = colors.grid;
  ctx.lineWidth = 1;
  ctx.strokeRect(rect.x, rect.y, rect.w, rect.h);
  ctx.fillStyle = colors.fg;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const [label, y] of ticks) ctx.fillText(label, rect.x - 4, y);
}

/** The palette of the current theme, from the frontend's CSS variables. */
export function themeColors() {
  const style = getComputedStyle(document.documentElement);
  return palette(Object.fromEntries(["--fg-color", "--bg-color", "--comfy-input-bg", "--border-color"]
    .map((name) => [name, style.getPropertyValue(name)])));
}
