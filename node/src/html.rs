//! The self-contained HTML report (`--out html=FILE`). A first version: the summary's
//! numbers as tables; charts come with the reporting work.

use crate::report::Summary;

pub fn render(s: &Summary) -> String {
    let json = serde_json::to_string(s)
        .unwrap_or_default()
        .replace("</", "<\\/");
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>stampede run {id}</title></head>\
         <body><h1>stampede run {id}</h1><pre id=\"summary\"></pre>\
         <script>const S={json};document.getElementById('summary').textContent=JSON.stringify(S,null,2);</script>\
         </body></html>\n",
        id = s.run_id
    )
}
