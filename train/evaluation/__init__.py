"""Stage 5 of the data flow: leave-one-domain-out accuracy of a model, and the paper-style report."""
