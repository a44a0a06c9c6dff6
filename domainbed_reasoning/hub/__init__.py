"""Stage 3 of DESIGN.md: chains + images -> the Hub-layout folder, its card, the upload, the loaders."""
