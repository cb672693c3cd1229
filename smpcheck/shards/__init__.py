"""What each rank holds, whatever wrapped the model: each tensor's pieces (``pieces``), which
elements of the full tensor a piece is (``selection``), names and local views the same under
any wrapper (``tensors``), and exact content digests (``digest``). Judges nothing; imports
neither the checks nor the layer that runs a recipe.
"""
