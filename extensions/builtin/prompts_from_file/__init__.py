"""Prompts from file, a built-in extension: a txt2img accordion that runs one generation per
line of a textbox or an uploaded text file, through the same job queue as Generate."""
import gradio as gr  # at module level: Gradio resolves the gr.Request annotation from here

from .batch import requests_from_text, run_lines


def register(api) -> None:
    api.add_accordion("txt2img", "Prompts from file or textbox", build)


def build(ui) -> None:
    tab = ui.tab
    controls = {
        "pff_text": gr.Textbox("", label="One prompt per line (or --prompt \"...\" --steps 20 --seed 5 ...)",
                               lines=4, elem_id=f"{tab}_pff_text"),
        "pff_file": gr.File(label="...or a .txt file", file_types=[".txt"], type="filepath",
                            elem_id=f"{tab}_pff_file"),
        "pff_iterate_seed": gr.Checkbox(False, label="Next seed for every line"),
    }
    run_button = gr.Button("Run all lines", variant="primary", elem_id=f"{tab}_pff_run")
    gallery = gr.Gallery(label="Images", columns=4, height=360, format="png", elem_id=f"{tab}_pff_gallery")
    summary = gr.Markdown("")

    # pff_file=None: the API parameter is optional (an empty gr.File has no default of its own).
    def run_all(request: gr.Request, *, pff_file=None, **values):
        text = values["pff_text"] or ""
        if pff_file:
            with open(pff_file, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        try:
            base = ui.request_from(values)
            requests = requests_from_text(base, text, bool(values["pff_iterate_seed"]))
            results = run_lines(requests, lambda r: ui.run(r, ui.owner(request)))
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from exc
        items = []
        for result in results:
            if result.paths and len(result.paths) == len(result.images):
                items += [str(p) for p in result.paths]
            else:
                items += list(result.images)
        return items, f"{len(results)} of {len(requests)} line(s) done, {len(items)} image(s)."

    # Public: /prompts_from_file takes the txt2img form fields plus pff_text, pff_file, pff_iterate_seed.
    run_button.click(run_all, inputs_kwargs=ui.form_inputs() | controls, outputs=[gallery, summary],
                     api_name="prompts_from_file")
