"""Lightning glue: the monitor (when and on which batches to measure, logging, history) and the collapse stopper."""
