// Train FeRA's live loss: the node listens to the "fera.train" event the trainer sends once per
// step and draws the latest step and loss under its title (the progress bar is ComfyUI's own).
// Save FeRA Adapter refreshes the node definitions once it has written a file, so the new
// adapter is offered by the loaders at once (what pressing R does).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { trainingText } from "./fera_train_text.js";

app.registerExtension({
  name: "fera.train",
  setup() {
    api.addEventListener("fera.train", ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail.node));
      if (!node) return;
      node.feraTraining = trainingText(detail);
      node.setDirtyCanvas?.(true, false);
    });
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "SaveFeRAAdapter") {
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function () {
        executed?.apply(this, arguments);
        app.refreshComboInNodes();
      };
      return;
    }
    if (nodeData.name !== "TrainFeRA") return;
    const draw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      draw?.apply(this, arguments);
      if (!this.feraTraining || this.flags?.collapsed) return;
      ctx.save();
      ctx.font = "12px monospace";
      ctx.fillStyle = "#9c9";
      ctx.fillText(this.feraTraining, 10, -(globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30) - 6);
      ctx.restore();
    };
  },
});
