"""The learned router: per-model success probabilities from the prompt, trained offline on routing
data sets, saved as a versioned artefact and loaded by the gateway (``load_router``)."""

from margin.router.artefact import FORMAT_VERSION, ArtefactError, LoadedRouter, load_router, save_router

__all__ = ["FORMAT_VERSION", "ArtefactError", "LoadedRouter", "load_router", "save_router"]
