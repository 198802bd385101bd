"""What is trained on: the paper's datasets and their registry (:mod:`.datasets`), and a
researcher's own loaders and builders named as ``"module:function"`` (:mod:`.user_code`)."""
