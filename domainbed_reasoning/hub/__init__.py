"""Stage 3 of the data flow: chains + images -> the Hub-layout folder, its card, the upload, the loaders."""
