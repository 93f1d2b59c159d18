"""Views of results: logged scalar keys, the TensorBoard dashboard and attribute figures. Imports only core."""
