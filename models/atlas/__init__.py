"""Atlas-style retrieval-augmented LM (Izacard et al. 2022): a dense retriever and a Fusion-in-Decoder reader."""
