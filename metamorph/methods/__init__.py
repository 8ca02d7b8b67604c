"""Methods built on the shared layers, one package each (NN-Factory; Bespoke and Learngene Pool
to come). See docs/DESIGN.md, "How to add a method"."""
