"""Stage 5 of DESIGN.md: leave-one-domain-out accuracy of a model, and the paper-style report."""
