"""Training of drafter networks: ``decodebench-train`` (:mod:`.cli`), the corpus of the target's own
answers (:mod:`.corpus`) and the one training loop (:mod:`.trainer`)."""
