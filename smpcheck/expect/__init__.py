"""What each rank should hold: every tensor's expected value and its source (``expected``),
through fused experts (``fused``), a resized vocabulary (``vocab``), PEFT's names
(``peft_names``) and a meta model built from the config (``skeleton``); whole attention
heads under TP (``heads``); and, in ``fresh/``, the init rule of a tensor no checkpoint holds
and its judge. Imports neither the checks nor the layer that runs a recipe.
"""
