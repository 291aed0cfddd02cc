"""X/Y/Z plot, a built-in extension: an accordion in txt2img and img2img that runs the current
form once per combination of up to three axes and saves a labelled grid with its infotext."""
import gradio as gr  # at module level: Gradio resolves the gr.Request annotation from here

from .axes import NOTHING, axis_types, make_axis
from .plot import run_plot

AXIS_NAMES = ("x", "y", "z")
GRID_CATEGORY = {"txt2img": "txt2img-grids", "img2img": "img2img-grids", "inpaint": "img2img-grids"}


def register(api) -> None:
    api.add_accordion("txt2img", "X/Y/Z plot", build)
    api.add_accordion("img2img", "X/Y/Z plot", build)


def build(ui) -> None:
    tab = ui.tab
    controls = {}
    for axis in AXIS_NAMES:
        with gr.Row():
            controls[f"xyz_{axis}_type"] = gr.Dropdown(list(axis_types()), value=NOTHING, scale=1,
                                                       label=f"{axis.upper()} type", elem_id=f"{tab}_xyz_{axis}_type")
            controls[f"xyz_{axis}_values"] = gr.Textbox("", label=f"{axis.upper()} values", scale=3,
                                                        placeholder="e.g. 10, 20, 30 or 1-9 (+2) or Euler, DDIM; Request field: hr_scale: 1.5, 2",
                                                        elem_id=f"{tab}_xyz_{axis}_values")
    controls["xyz_save"] = gr.Checkbox(True, label="Save the grid (with infotext)")
    run_button = gr.Button("Make X/Y/Z grid", variant="primary", elem_id=f"{tab}_xyz_run")
    gallery = gr.Gallery(label="Grids", columns=1, height=480, format="png", elem_id=f"{tab}_xyz_gallery")
    infotext = gr.Textbox(label="Grid infotext", lines=3, interactive=False, elem_id=f"{tab}_xyz_infotext")

    # The images default to None so that API callers may leave them out, as in /img2img.
    def make_grid(request: gr.Request, *, init_image=None, inpaint_image=None, mask=None, **values):
        if tab == "img2img":
            values.update(init_image=init_image, inpaint_image=inpaint_image, mask=mask)
        try:
            base = ui.request_from(values)
            axes = [make_axis(values[f"xyz_{a}_type"], values[f"xyz_{a}_values"], base) for a in AXIS_NAMES
                    if values[f"xyz_{a}_type"] != NOTHING]
            result = run_plot(base, axes, lambda r: ui.run(r, ui.owner(request)))
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from exc
        items = []
        for grid in result.grids:
            if values["xyz_save"]:
                path = ui.save_image(grid.image, grid.infotext, GRID_CATEGORY[base.task], seed=grid.seed)
                items.append((str(path), grid.z_label or None))
            else:
                items.append((grid.image, grid.z_label or None))
        return items, "\n\n".join(g.infotext for g in result.grids)

    # Public: /txt2img_xyz_plot and /img2img_xyz_plot take the tab's form fields plus the xyz_* fields.
    run_button.click(make_grid, inputs_kwargs=ui.form_inputs() | controls, outputs=[gallery, infotext],
                     api_name=f"{tab}_xyz_plot")
