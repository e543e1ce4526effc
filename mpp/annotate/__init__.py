"""`mpp annotate`: footage (video files or frames) and a cast folder in, the raw layout that
`mpp.prepare` reads out (DESIGN.md section 2).

    mpp annotate FRAMES_OR_VIDEOS RAW --cast CAST_DIR [--detector grounding-dino|owlv2|toy]
                 [--captioner florence2|blip|toy] [--dino facebook/dinov2-large] [--clusters edited.json]

Two passes. *Analysis* (`mpp.annotate.analyse`, resumable and shardable: `--num_shards K
--shard_index I`) samples frames per shot (`mpp.annotate.frames`), detects instances, captions them
and embeds each box with DINOv2, caching each frame under RAW/annotate/work/. *Assembly*
(`mpp.annotate.assemble`, one process, once every frame is analysed) links boxes to the cast
(`mpp.annotate.cast`), clusters the unlinked recurring identities into a contact sheet the user
edits and applies on a rerun (`mpp.annotate.clusters`), and writes the raw samples and a report.
"""
