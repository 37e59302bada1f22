"""How weights are held: the release's int8 format with block scales (`quant`), the compute
layout that loaded weights take (`layout`), the layers stacked for the model's one layer body
(`stacking`), and where each parameter lives on a mesh (`placement`). Each format owns its
sharding and its moves between host and devices."""
