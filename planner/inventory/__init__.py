"""What a pipeline holds (components, layer lists, bytes): from the catalog, a folder's headers,
class names or a loaded pipeline; one layer discovery for all of them."""
